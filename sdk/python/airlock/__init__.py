"""Python client for airlock: sandboxes for untrusted, model-written code.

Talks to brokerd over its Unix socket (``socket=``, else
``$AIRLOCK_SOCKET``, else ``/run/airlock/brokerd.sock``)::

    from airlock import Sandbox

    with Sandbox.create() as sb:
        sb.files.write("/workspace/hello.py", "print('hi')")
        r = sb.commands.run("python3 /workspace/hello.py")
        print(r.exit_code, r.stdout)

Errors are :class:`AirlockError` (and subclasses by status) carrying the
API's message. :mod:`airlock.aio` has the asyncio variant.
"""

from .errors import AirlockError, BadRequest, Conflict, Forbidden, NoSpace, NotFound
from .sandbox import (
    CommandHandle,
    CommandResult,
    FileInfo,
    PtyHandle,
    Sandbox,
    Snapshot,
    audit,
    sandboxes,
)

__all__ = [
    "AirlockError",
    "BadRequest",
    "CommandHandle",
    "CommandResult",
    "Conflict",
    "FileInfo",
    "Forbidden",
    "NoSpace",
    "NotFound",
    "PtyHandle",
    "Sandbox",
    "Snapshot",
    "audit",
    "sandboxes",
]
__version__ = "0.1.0"
