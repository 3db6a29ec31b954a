"""A minimal WebSocket client (RFC 6455) over brokerd's Unix socket, for
attached commands; standard library only."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
from typing import Optional, Tuple

from .errors import AirlockError, error_for

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Largest message accepted from the server.
MAX_MESSAGE = 16 << 20


class WebSocket:
    """One client connection: text and binary messages both ways."""

    def __init__(self, socket_path: str, path: str, timeout: float = 120.0) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(socket_path)
        except OSError as e:
            s.close()
            raise AirlockError(0, f"cannot connect to brokerd at {socket_path}: {e}") from e
        key = base64.b64encode(os.urandom(16))
        s.sendall(
            b"GET " + path.encode() + b" HTTP/1.1\r\nHost: airlock\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                s.close()
                raise AirlockError(0, "brokerd closed the connection during the upgrade")
            head += chunk
            if len(head) > 65536:
                s.close()
                raise AirlockError(0, "upgrade answer too large")
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.decode(errors="replace").split("\r\n")
        status = int(lines[0].split()[1]) if len(lines[0].split()) > 1 else 0
        headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
        if status != 101:
            length = int(headers.get("content-length", "0") or 0)
            while len(rest) < length:
                chunk = s.recv(65536)
                if not chunk:
                    break
                rest += chunk
            s.close()
            raise error_for(status, rest[:length])
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            s.close()
            raise AirlockError(0, "bad WebSocket handshake answer")
        s.settimeout(None)
        self._sock = s
        self._buf = rest

    def _send(self, opcode: int, payload: bytes) -> None:
        head = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self._sock.sendall(head + mask + masked)

    def send_text(self, text: str) -> None:
        self._send(0x1, text.encode())

    def send_binary(self, data: bytes) -> None:
        self._send(0x2, data)

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise EOFError
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def recv(self) -> Optional[Tuple[int, bytes]]:
        """The next message as (opcode, payload); None once closed."""
        parts = b""
        opcode = 0
        try:
            while True:
                b0, b1 = self._read(2)
                n = b1 & 0x7F
                if n == 126:
                    (n,) = struct.unpack("!H", self._read(2))
                elif n == 127:
                    (n,) = struct.unpack("!Q", self._read(8))
                mask = self._read(4) if b1 & 0x80 else None
                if n > MAX_MESSAGE or len(parts) + n > MAX_MESSAGE:
                    raise AirlockError(0, "a message over the size limit")
                data = self._read(n)
                if mask:
                    data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
                op = b0 & 0x0F
                if op == 0x8:
                    return None
                if op == 0x9:
                    self._send(0xA, data)
                    continue
                if op == 0xA:
                    continue
                if op != 0:
                    opcode = op
                parts += data
                if b0 & 0x80:
                    return opcode, parts
        except (EOFError, OSError):
            return None

    def close(self) -> None:
        try:
            self._send(0x8, b"")
        except OSError:
            pass
        self._sock.close()


def attach(socket_path: str, sandbox_id: str, body: dict) -> WebSocket:
    ws = WebSocket(socket_path, f"/v1/sandboxes/{sandbox_id}/exec/attach")
    ws.send_text(json.dumps(body))
    return ws
