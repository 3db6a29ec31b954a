"""brokerd's HTTP API over its Unix socket, for the benchmarks."""
import http.client
import json
import socket


class UnixConn(http.client.HTTPConnection):
    def __init__(self, path, timeout=600):
        super().__init__("airlock", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def api(sock, method, url, body=None):
    """One request; the answer's body, or RuntimeError naming the status."""
    c = UnixConn(sock)
    c.request(method, url, body=json.dumps(body) if body is not None else None)
    r = c.getresponse()
    data = r.read()
    if r.status >= 400:
        raise RuntimeError(f"{method} {url}: {r.status} {data!r}")
    return data
