"""A small real HTTP/1.1 upstream for the balancer's integration tests: `python balancer_upstream.py PORT NAME`.

Endpoints: /health/ping, /whoami (name and the headers it received), /hang
(never answers), /slow?s= (answers after s seconds), /download?size=&chunked=1,
/split?gap=&reset=1 (head and part of the body, the rest after a gap, or a
reset instead), /hits (how many /split requests this upstream saw), /junk (an
answer followed by bytes that are no answer), /double (two answers to one request),
POST /upload (reads the body as it comes, answers its size and sha256),
/status (as if it were the monitor), /seen (every request this upstream parsed, but
/seen and /health/ping: method, path, X-Appliance-Client). Keep-alive, threads, no
buffering of bodies.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import sys
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "upstream"
    name = "?"

    def log_message(self, fmt: str, *args: object) -> None:
        pass

    seen: list[dict[str, object]] = []

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok and not self.path.startswith(("/seen", "/health/ping")):
            Handler.seen.append({"method": self.command, "path": self.path, "client": self.headers.get("X-Appliance-Client")})
        return ok

    def _json(self, status: int, data: object) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.headers.get("X-Request-ID"):
            self.send_header("X-Request-ID", self.headers["X-Request-ID"])
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/health/ping":
            return self._json(200, {"status": "ok", "node_id": self.name})
        if url.path in ("/whoami", "/api/protected", "/status", "/auth/login"):
            return self._json(200, {"node": self.name, "path": self.path, "headers": [[k.lower(), v] for k, v in self.headers.items()]})
        if url.path == "/hang":
            time.sleep(3600)
        if url.path == "/slow":
            time.sleep(float(query.get("s", "1")))
            return self._json(200, {"node": self.name})
        if url.path == "/download":
            size = int(query.get("size", "0"))
            block = b"x" * 65536
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            chunked = query.get("chunked") == "1"
            self.send_header("Transfer-Encoding", "chunked") if chunked else self.send_header("Content-Length", str(size))
            self.end_headers()
            left = size
            while left:
                piece = block[: min(left, len(block))]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                left -= len(piece)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            return
        if url.path == "/split":
            return self._split(float(query.get("gap", "0.2")), query.get("reset") == "1")
        if url.path == "/junk":  # a whole answer and bytes that are no answer, in one send
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\x00junk that is no answer\r\n")
            return
        if url.path == "/double":  # two answers to one request, in one send
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirstHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
            return
        if url.path == "/seen":
            return self._json(200, {"node": self.name, "seen": Handler.seen})
        if url.path == "/hits":
            return self._json(200, {"node": self.name, "split": Handler.split_hits})
        return self._json(404, {"status": "error", "error": {"code": "not_found", "message": url.path}})

    split_hits = 0

    def _split(self, gap: float, reset: bool) -> None:
        """The head and 3 body bytes now, the other 7 after `gap` seconds (or a connection reset)."""
        Handler.split_hits += 1
        # One send, so that the balancer reads the head and the first bytes together.
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\n012")
        time.sleep(gap)
        if reset:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        self.wfile.write(b"3456789")

    do_HEAD = do_GET
    do_DELETE = do_GET

    def do_POST(self) -> None:
        digest = hashlib.sha256()
        size = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                n = int(self.rfile.readline().split(b";")[0], 16)
                if n == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                left = n
                while left:
                    data = self.rfile.read(min(left, 65536))
                    digest.update(data)
                    size += len(data)
                    left -= len(data)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                data = self.rfile.read(min(left, 65536))
                if not data:
                    break
                digest.update(data)
                size += len(data)
                left -= len(data)
        return self._json(200, {"node": self.name, "size": size, "sha256": digest.hexdigest(), "path": self.path})

    do_PUT = do_POST


def main() -> None:
    port, name = int(sys.argv[1]), sys.argv[2]
    Handler.name = name
    ThreadingHTTPServer.request_queue_size = 1024  # read by listen() in the constructor
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
