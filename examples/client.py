#!/usr/bin/env python3
"""A minimal airlock API client using only the standard library."""
import http.client
import json
import socket
import sys


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("airlock")
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


class Airlock:
    def __init__(self, path="/run/airlock/brokerd.sock"):
        self.path = path

    def _call(self, method, url, body=None):
        c = UnixHTTPConnection(self.path)
        c.request(method, url, body=json.dumps(body) if body is not None else None,
                  headers={"content-type": "application/json"})
        return c.getresponse()

    def _json(self, method, url, body=None):
        r = self._call(method, url, body)
        data = json.loads(r.read() or b"null")
        if r.status >= 400:
            raise RuntimeError(f"{r.status}: {data.get('error')}")
        return data

    def create(self, **kw):
        return self._json("POST", "/v1/sandboxes", kw)

    def exec(self, sid, argv, **kw):
        """Yields (stream, bytes) pairs, then returns the exit record."""
        r = self._call("POST", f"/v1/sandboxes/{sid}/exec", dict(argv=argv, **kw))
        if r.status >= 400:
            raise RuntimeError(f"{r.status}: {json.loads(r.read()).get('error')}")
        for line in r:
            ev = json.loads(line)
            if ev["type"] in ("stdout", "stderr"):
                yield ev["type"], ev.get("data", "")
            elif ev["type"] == "exit":
                yield "exit", ev

    def destroy(self, sid):
        return self._json("DELETE", f"/v1/sandboxes/{sid}")

    def audit(self, **params):
        q = "&".join(f"{k}={v}" for k, v in params.items())
        return self._json("GET", f"/v1/audit?{q}")


if __name__ == "__main__":
    a = Airlock()
    sb = a.create(limits={"memory_bytes": 512 << 20})
    try:
        for kind, data in a.exec(sb["id"], sys.argv[1:] or ["uname", "-a"]):
            print(kind, data)
    finally:
        a.destroy(sb["id"])
