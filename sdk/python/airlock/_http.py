"""HTTP/1.1 over brokerd's Unix socket, with the standard library only."""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.parse
from typing import Any, BinaryIO, Dict, Iterator, Optional, Union

from .errors import AirlockError, error_for

DEFAULT_SOCKET = "/run/airlock/brokerd.sock"
#: Seconds a reply may take to start (creates wait for a sandbox to boot).
DEFAULT_TIMEOUT = 120.0
#: Largest non-streamed reply read.
MAX_REPLY = 64 << 20
#: Longest line of a streamed reply.
MAX_LINE = 16 << 20


def socket_path(explicit: Optional[str] = None) -> str:
    """The socket to use: `explicit`, else $AIRLOCK_SOCKET, else the default."""
    return explicit or os.environ.get("AIRLOCK_SOCKET") or DEFAULT_SOCKET


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: Optional[float]) -> None:
        super().__init__("airlock", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError as e:
            s.close()
            raise AirlockError(0, f"cannot connect to brokerd at {self._path}: {e}") from e
        self.sock = s


def quote(s: str) -> str:
    return urllib.parse.quote(s, safe="")


class Transport:
    """One request per connection (the socket is local: connecting is cheap)."""

    def __init__(self, socket: Optional[str] = None, timeout: Optional[float] = None) -> None:
        self.socket = socket_path(socket)
        self.timeout = DEFAULT_TIMEOUT if timeout is None else timeout

    def _open(
        self,
        method: str,
        path: str,
        body: Union[None, bytes, BinaryIO] = None,
        length: Optional[int] = None,
        content_type: str = "application/json",
    ) -> http.client.HTTPResponse:
        conn = _UnixConnection(self.socket, self.timeout)
        headers = {"Content-Type": content_type}
        if length is not None:
            headers["Content-Length"] = str(length)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
        except AirlockError:
            conn.close()
            raise
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise AirlockError(0, f"talking to brokerd at {self.socket}: {e}") from e
        if resp.status >= 400:
            data = resp.read(MAX_REPLY)
            conn.close()
            raise error_for(resp.status, data)
        return resp

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """A request with a JSON body (if any) and a JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        resp = self._open(method, path, data, None if data is None else len(data))
        raw = resp.read(MAX_REPLY + 1)
        resp.close()
        if len(raw) > MAX_REPLY:
            raise AirlockError(0, f"reply over {MAX_REPLY} bytes")
        return json.loads(raw) if raw.strip() else None

    def stream(self, method: str, path: str, body: Any = None, timeout: Optional[float] = None) -> Iterator[Dict[str, Any]]:
        """A request whose answer is one JSON object per line, as they come."""
        data = None if body is None else json.dumps(body).encode()
        resp = self._open(method, path, data, None if data is None else len(data))
        if resp.fp is not None and hasattr(resp.fp, "raw"):
            # Streams may be silent for long: no read timeout once started.
            try:
                resp.fp.raw._sock.settimeout(timeout)  # type: ignore[attr-defined]
            except AttributeError:
                pass
        try:
            while True:
                line = resp.readline(MAX_LINE + 1)
                if not line:
                    return
                if len(line) > MAX_LINE:
                    raise AirlockError(0, f"a streamed line over {MAX_LINE} bytes")
                if line.strip():
                    yield json.loads(line)
        finally:
            resp.close()

    def download(self, path: str) -> http.client.HTTPResponse:
        """A request whose answer is raw bytes, to read as they come."""
        return self._open("GET", path)

    def upload(self, path: str, data: Union[bytes, BinaryIO], length: int) -> Any:
        resp = self._open("PUT", path, data, length, "application/octet-stream")
        raw = resp.read(MAX_REPLY)
        resp.close()
        return json.loads(raw)
