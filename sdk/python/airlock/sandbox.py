"""Sandboxes, their commands, files and snapshots."""

from __future__ import annotations

import base64
import io
import os
import threading
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Union

from ._http import Transport, quote
from .errors import AirlockError

Command = Union[str, Sequence[str]]
OnOutput = Optional[Callable[[str], None]]


@dataclass
class CommandResult:
    """How a command ended, with its whole output."""

    exit_code: int
    """What a shell would report: the exit status, or 128 + the signal."""
    stdout: str
    stderr: str
    signal: Optional[int] = None
    timed_out: bool = False
    oom: bool = False
    error: Optional[str] = None
    """Why the command could not start, if it could not."""
    duration_ms: int = 0


@dataclass
class FileInfo:
    """An entry in a sandbox's tree."""

    name: str
    type: str
    """`file`, `dir`, `symlink` or `other`."""
    size: int
    mode: int
    mtime_ms: int
    target: Optional[str] = None

    @staticmethod
    def of(d: Dict[str, Any]) -> "FileInfo":
        return FileInfo(
            name=d["name"],
            type=d["type"],
            size=d["size"],
            mode=d["mode"],
            mtime_ms=d["mtime_ms"],
            target=d.get("target"),
        )


@dataclass
class Snapshot:
    """A snapshot of a sandbox's files."""

    name: str
    created_ms: int
    bytes: Optional[int] = None


def _argv(cmd: Command) -> List[str]:
    if isinstance(cmd, str):
        return ["sh", "-c", cmd]
    argv = [str(a) for a in cmd]
    if not argv:
        raise ValueError("an empty command")
    return argv


def _text(chunk: Dict[str, Any]) -> bytes:
    if "data" in chunk and chunk["data"] is not None:
        return str(chunk["data"]).encode()
    return base64.b64decode(chunk.get("data_b64") or "")


def _result_of(ev: Dict[str, Any], out: bytes, err: bytes) -> CommandResult:
    """A command's result from its exit event and its output."""
    code, sig = ev.get("code"), ev.get("signal")
    return CommandResult(
        exit_code=code if code is not None else 128 + (sig or 0),
        stdout=out.decode(errors="replace"),
        stderr=err.decode(errors="replace"),
        signal=sig,
        timed_out=bool(ev.get("timed_out")),
        oom=bool(ev.get("oom")),
        error=ev.get("error"),
        duration_ms=int(ev.get("duration_ms") or 0),
    )


class CommandHandle:
    """A command running in the background (`commands.run(..., background=True)`)."""

    def __init__(self, sandbox: "Sandbox", events: Iterator[Dict[str, Any]], on_stdout: OnOutput, on_stderr: OnOutput) -> None:
        self._sandbox = sandbox
        self._events = events
        self._on_stdout = on_stdout
        self._on_stderr = on_stderr
        self._started = threading.Event()
        self._done = threading.Event()
        self.exec_id: Optional[int] = None
        self._result: Optional[CommandResult] = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        out, err = io.BytesIO(), io.BytesIO()
        try:
            for ev in self._events:
                kind = ev.get("type")
                if kind == "started":
                    self.exec_id = ev.get("exec_id")
                    self._started.set()
                elif kind == "stdout":
                    data = _text(ev)
                    out.write(data)
                    if self._on_stdout:
                        self._on_stdout(data.decode(errors="replace"))
                elif kind == "stderr":
                    data = _text(ev)
                    err.write(data)
                    if self._on_stderr:
                        self._on_stderr(data.decode(errors="replace"))
                elif kind == "exit":
                    self._result = _result_of(ev, out.getvalue(), err.getvalue())
        except BaseException as e:  # noqa: BLE001 - handed to wait()
            self._error = e
        finally:
            self._started.set()
            self._done.set()

    def wait(self, timeout: Optional[float] = None) -> CommandResult:
        """Waits for the command to end; its result."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"command still running after {timeout}s")
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise AirlockError(0, "the command's stream ended without an exit")
        return self._result

    def send_signal(self, signal: int) -> None:
        """Sends `signal` to the command's process group."""
        self._started.wait()
        if self.exec_id is None:
            return
        self._sandbox._t.call(
            "POST",
            f"/v1/sandboxes/{self._sandbox.id}/execs/{self.exec_id}/signal",
            {"signal": signal},
        )

    def kill(self) -> None:
        """SIGKILLs the command."""
        self.send_signal(9)


class PtyHandle:
    """A command on a terminal inside the sandbox (`sandbox.pty.create`)."""

    def __init__(self, ws: Any, on_data: Optional[Callable[[bytes], None]]) -> None:
        self._ws = ws
        self._on_data = on_data
        self._out = io.BytesIO()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._result: Optional[CommandResult] = None
        self._error: Optional[str] = None
        self.exec_id: Optional[int] = None
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        import json as _json

        try:
            while True:
                msg = self._ws.recv()
                if msg is None:
                    return
                op, payload = msg
                if op != 0x1:
                    continue
                ev = _json.loads(payload)
                if "error" in ev and "type" not in ev:
                    self._error = ev["error"]
                    return
                kind = ev.get("type")
                if kind == "started":
                    self.exec_id = ev.get("exec_id")
                elif kind in ("stdout", "stderr"):
                    data = _text(ev)
                    with self._lock:
                        self._out.write(data)
                    if self._on_data:
                        self._on_data(data)
                elif kind == "exit":
                    with self._lock:
                        out = self._out.getvalue()
                    self._result = _result_of(ev, out, b"")
                    return
        finally:
            self._done.set()
            self._ws.close()

    @property
    def output(self) -> bytes:
        """Everything the terminal has shown so far."""
        with self._lock:
            return self._out.getvalue()

    def send_input(self, data: Union[bytes, str]) -> None:
        """Types `data` into the terminal (b"\\x03" is Ctrl-C)."""
        self._ws.send_binary(data.encode() if isinstance(data, str) else bytes(data))

    def resize(self, rows: int, cols: int) -> None:
        import json as _json

        self._ws.send_text(_json.dumps({"resize": {"rows": rows, "cols": cols}}))

    def kill(self) -> None:
        import json as _json

        self._ws.send_text(_json.dumps({"signal": 9}))

    def wait(self, timeout: Optional[float] = None) -> CommandResult:
        """Waits for the command to end; its result (`stdout`: all it showed)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"terminal command still running after {timeout}s")
        if self._result is None:
            raise AirlockError(0, self._error or "the terminal closed without an exit")
        return self._result


class Pty:
    """`sandbox.pty`: commands on a terminal (job control, Ctrl-C, resizes)."""

    def __init__(self, sandbox: "Sandbox") -> None:
        self._sb = sandbox

    def create(
        self,
        cmd: Command = "bash",
        *,
        rows: int = 24,
        cols: int = 80,
        env: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        on_data: Optional[Callable[[bytes], None]] = None,
    ) -> PtyHandle:
        """Starts `cmd` on a terminal of `rows` x `cols`."""
        from ._ws import attach

        body: Dict[str, Any] = {"argv": _argv(cmd), "tty": True, "size": {"rows": rows, "cols": cols}}
        if env:
            body["env"] = [f"{k}={v}" for k, v in env.items()]
        if cwd:
            body["cwd"] = cwd
        if user:
            body["user"] = user
        return PtyHandle(attach(self._sb._t.socket, self._sb.id, body), on_data)


class Commands:
    """`sandbox.commands`."""

    def __init__(self, sandbox: "Sandbox") -> None:
        self._sb = sandbox

    def run(
        self,
        cmd: Command,
        *,
        env: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        timeout: Optional[float] = None,
        stdin: Optional[str] = None,
        on_stdout: OnOutput = None,
        on_stderr: OnOutput = None,
        background: bool = False,
    ) -> Any:
        """Runs `cmd` (a string runs under `sh -c`; a list is the argv).

        Returns a :class:`CommandResult` once it ends, or at once a
        :class:`CommandHandle` with ``background=True``. ``timeout`` is in
        seconds (rounded up; ``None`` or 0: none). A non-zero exit is not
        an exception: look at ``exit_code``.
        """
        body: Dict[str, Any] = {"argv": _argv(cmd)}
        if env:
            body["env"] = [f"{k}={v}" for k, v in env.items()]
        if cwd:
            body["cwd"] = cwd
        if user:
            body["user"] = user
        if stdin is not None:
            body["stdin"] = stdin
        if timeout:
            body["timeout_secs"] = max(1, int(-(-timeout // 1)))
        events = self._sb._t.stream("POST", f"/v1/sandboxes/{self._sb.id}/exec", body)
        handle = CommandHandle(self._sb, events, on_stdout, on_stderr)
        return handle if background else handle.wait()


class Files:
    """`sandbox.files`: paths are absolute paths inside the sandbox."""

    def __init__(self, sandbox: "Sandbox") -> None:
        self._sb = sandbox

    def _url(self, what: str, path: str, **extra: Any) -> str:
        q = "&".join(f"{k}={quote(str(v))}" for k, v in extra.items() if v is not None)
        return f"/v1/sandboxes/{self._sb.id}/files/{what}?path={quote(path)}" + (f"&{q}" if q else "")

    def read(self, path: str, *, offset: int = 0, length: Optional[int] = None) -> bytes:
        """The file's bytes (from `offset`, `length` of them at most)."""
        resp = self._sb._t.download(self._url("content", path, offset=offset or None, length=length))
        try:
            return resp.read()
        finally:
            resp.close()

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read(path).decode(encoding)

    def read_to(self, path: str, out: BinaryIO, chunk: int = 1 << 20) -> int:
        """Streams the file into `out`; how many bytes."""
        resp = self._sb._t.download(self._url("content", path))
        n = 0
        try:
            while True:
                b = resp.read(chunk)
                if not b:
                    return n
                out.write(b)
                n += len(b)
        finally:
            resp.close()

    def write(self, path: str, data: Union[bytes, str, BinaryIO], *, mode: Optional[int] = None) -> FileInfo:
        """Replaces (or makes) the file, atomically; a file object is streamed."""
        if isinstance(data, str):
            data = data.encode()
        if isinstance(data, (bytes, bytearray)):
            length = len(data)
        else:
            try:
                length = os.fstat(data.fileno()).st_size - data.tell()
            except (AttributeError, OSError, io.UnsupportedOperation):
                data = data.read()
                length = len(data)
        url = self._url("content", path, mode=None if mode is None else format(mode, "o"))
        return FileInfo.of(self._sb._t.upload(url, data, length))

    def list(self, path: str = "/workspace") -> List[FileInfo]:
        return [FileInfo.of(d) for d in self._sb._t.call("GET", self._url("list", path))]

    def stat(self, path: str) -> FileInfo:
        return FileInfo.of(self._sb._t.call("GET", self._url("stat", path)))

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
            return True
        except AirlockError as e:
            if e.status == 404:
                return False
            raise

    def mkdir(self, path: str, *, parents: bool = True, mode: Optional[int] = None) -> FileInfo:
        body: Dict[str, Any] = {"path": path, "parents": parents}
        if mode is not None:
            body["mode"] = mode
        return FileInfo.of(self._sb._t.call("POST", f"/v1/sandboxes/{self._sb.id}/files/mkdir", body))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        self._sb._t.call("POST", f"/v1/sandboxes/{self._sb.id}/files/remove", {"path": path, "recursive": recursive})

    def rename(self, src: str, dst: str) -> FileInfo:
        return FileInfo.of(self._sb._t.call("POST", f"/v1/sandboxes/{self._sb.id}/files/rename", {"from": src, "to": dst}))

    def watch(self, path: str = "/workspace") -> Iterator[Dict[str, Any]]:
        """Changes under `path` as they happen: dicts with `event`
        (created, modified, removed, renamed), `path` and, for renames,
        `to`. Ends when the sandbox goes; break out to stop."""
        return self._sb._t.stream("GET", self._url("watch", path))


@dataclass
class Sandbox:
    """A sandbox held by brokerd. Use as a context manager to destroy it on exit."""

    id: str
    info: Dict[str, Any] = field(repr=False)
    _t: Transport = field(repr=False)

    def __post_init__(self) -> None:
        self.commands = Commands(self)
        self.files = Files(self)
        self.pty = Pty(self)

    @classmethod
    def create(
        cls,
        *,
        agent: Optional[str] = None,
        user: Optional[str] = None,
        env: Optional[Dict[str, str]] = None,
        memory_bytes: Optional[int] = None,
        pids: Optional[int] = None,
        cpu_millis: Optional[int] = None,
        disk_bytes: Optional[int] = None,
        timeout_secs: Optional[int] = None,
        network: Optional[Dict[str, Any]] = None,
        workspace: Optional[str] = None,
        from_snapshot: Optional[str] = None,
        gpus: Optional[List[str]] = None,
        socket: Optional[str] = None,
    ) -> "Sandbox":
        """Creates a sandbox (see `POST /v1/sandboxes` for each field)."""
        t = Transport(socket)
        body: Dict[str, Any] = {}
        for k, v in (
            ("agent", agent),
            ("user", user),
            ("timeout_secs", timeout_secs),
            ("network", network),
            ("workspace", workspace),
            ("from_snapshot", from_snapshot),
            ("gpus", gpus),
        ):
            if v is not None:
                body[k] = v
        if env:
            body["env"] = [f"{k}={v}" for k, v in env.items()]
        limits = {
            k: v
            for k, v in (
                ("memory_bytes", memory_bytes),
                ("pids", pids),
                ("cpu_millis", cpu_millis),
                ("disk_bytes", disk_bytes),
            )
            if v is not None
        }
        if limits:
            body["limits"] = limits
        info = t.call("POST", "/v1/sandboxes", body)
        return cls(id=info["id"], info=info, _t=t)

    @classmethod
    def connect(cls, id: str, *, socket: Optional[str] = None) -> "Sandbox":
        """A handle on an existing sandbox."""
        t = Transport(socket)
        info = t.call("GET", f"/v1/sandboxes/{quote(id)}")
        return cls(id=info["id"], info=info, _t=t)

    def inspect(self) -> Dict[str, Any]:
        """The sandbox as `airlock inspect` shows it."""
        self.info = self._t.call("GET", f"/v1/sandboxes/{self.id}")
        return self.info

    def snapshot(self, name: Optional[str] = None) -> Snapshot:
        """Freezes its files (O(1)); the sandbox must be idle."""
        d = self._t.call("POST", f"/v1/sandboxes/{self.id}/snapshots", {"name": name} if name else {})
        return Snapshot(d["name"], d["created_ms"], d.get("bytes"))

    def snapshots(self) -> List[Snapshot]:
        return [Snapshot(d["name"], d["created_ms"], d.get("bytes")) for d in self._t.call("GET", f"/v1/sandboxes/{self.id}/snapshots")]

    def restore(self, name: str) -> Snapshot:
        """Brings back the files of snapshot `name` exactly (O(1))."""
        d = self._t.call("POST", f"/v1/sandboxes/{self.id}/snapshots/{quote(name)}/restore")
        return Snapshot(d["name"], d["created_ms"], d.get("bytes"))

    def remove_snapshot(self, name: str) -> None:
        self._t.call("DELETE", f"/v1/sandboxes/{self.id}/snapshots/{quote(name)}")

    def kill(self) -> int:
        """SIGKILLs every process in it but its init; how many."""
        return int(self._t.call("POST", f"/v1/sandboxes/{self.id}/kill")["killed"])

    def destroy(self) -> None:
        """Destroys it (nothing of it is left)."""
        try:
            self._t.call("DELETE", f"/v1/sandboxes/{self.id}")
        except AirlockError as e:
            if e.status != 404:
                raise

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.destroy()


def sandboxes(*, socket: Optional[str] = None) -> List[Dict[str, Any]]:
    """The sandboxes the caller may see."""
    return list(Transport(socket).call("GET", "/v1/sandboxes"))


def audit(
    *,
    sandbox: Optional[str] = None,
    agent: Optional[str] = None,
    kind: Optional[str] = None,
    since: Optional[str] = None,
    limit: Optional[int] = None,
    socket: Optional[str] = None,
) -> List[Dict[str, Any]]:
    """Audit rows the caller may see, oldest first (`kind`: comma-separated;
    `since`: e.g. "10m" or an RFC 3339 time)."""
    q = "&".join(
        f"{k}={quote(str(v))}"
        for k, v in (("sandbox", sandbox), ("agent", agent), ("kind", kind), ("since", since), ("limit", limit))
        if v is not None
    )
    return list(Transport(socket).call("GET", "/v1/audit" + (f"?{q}" if q else "")))
