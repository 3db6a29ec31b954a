"""The asyncio variant: the same calls, awaitable.

Each call runs the blocking client on a worker thread
(:func:`asyncio.to_thread`), so an event loop is never blocked by a
sandbox's command or a large file.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Dict, List, Optional

from .sandbox import CommandResult, FileInfo, Sandbox, Snapshot
from .sandbox import audit as _audit


class AsyncCommands:
    def __init__(self, sb: Sandbox) -> None:
        self._sb = sb

    async def run(self, cmd: Any, **kw: Any) -> CommandResult:
        kw.pop("background", None)
        return await asyncio.to_thread(self._sb.commands.run, cmd, **kw)


class AsyncFiles:
    def __init__(self, sb: Sandbox) -> None:
        self._sb = sb

    async def read(self, path: str, **kw: Any) -> bytes:
        return await asyncio.to_thread(self._sb.files.read, path, **kw)

    async def write(self, path: str, data: Any, **kw: Any) -> FileInfo:
        return await asyncio.to_thread(self._sb.files.write, path, data, **kw)

    async def list(self, path: str = "/workspace") -> List[FileInfo]:
        return await asyncio.to_thread(self._sb.files.list, path)

    async def stat(self, path: str) -> FileInfo:
        return await asyncio.to_thread(self._sb.files.stat, path)

    async def remove(self, path: str, **kw: Any) -> None:
        await asyncio.to_thread(self._sb.files.remove, path, **kw)

    async def mkdir(self, path: str, **kw: Any) -> FileInfo:
        return await asyncio.to_thread(self._sb.files.mkdir, path, **kw)

    async def watch(self, path: str = "/workspace") -> AsyncIterator[Dict[str, Any]]:
        it = self._sb.files.watch(path)
        done = object()
        while True:
            ev = await asyncio.to_thread(next, it, done)
            if ev is done:
                return
            yield ev  # type: ignore[misc]


class AsyncSandbox:
    """A sandbox for asyncio code; ``async with`` destroys it on exit."""

    def __init__(self, sb: Sandbox) -> None:
        self.sync = sb
        self.id = sb.id
        self.commands = AsyncCommands(sb)
        self.files = AsyncFiles(sb)

    @classmethod
    async def create(cls, **kw: Any) -> "AsyncSandbox":
        return cls(await asyncio.to_thread(lambda: Sandbox.create(**kw)))

    async def snapshot(self, name: Optional[str] = None) -> Snapshot:
        return await asyncio.to_thread(self.sync.snapshot, name)

    async def restore(self, name: str) -> Snapshot:
        return await asyncio.to_thread(self.sync.restore, name)

    async def kill(self) -> int:
        return await asyncio.to_thread(self.sync.kill)

    async def destroy(self) -> None:
        await asyncio.to_thread(self.sync.destroy)

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.destroy()


async def audit(**kw: Any) -> List[Dict[str, Any]]:
    return await asyncio.to_thread(lambda: _audit(**kw))
