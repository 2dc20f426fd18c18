"""A stand-in child for testing the arbiter without the real roles.

usage: child.py MODE [PORT]
  http PORT   serve GET /health/ping (200) and GET /slow?s=N on 127.0.0.1:PORT; SIGTERM stops accepting,
              finishes in-flight requests, exits 0
  crash       print a line and exit 1 at once
  bootfail    print a line and exit 3 (cannot boot)
  idle        heartbeat only; SIGTERM exits 0
  hang        heartbeat once, then stop heart-beating (a hung process)
  stubborn    heartbeat; ignores SIGTERM (only SIGKILL stops it)
  crashif F   like idle, but crash at start when the file F exists
Heartbeats touch $APPLIANCE_HEARTBEAT_FILE every 0.2 s.
"""

import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

mode = sys.argv[1]
stop = threading.Event()
beating = threading.Event()
beating.set()


def beat() -> None:
    path = os.environ.get("APPLIANCE_HEARTBEAT_FILE")
    while not stop.is_set():
        if path and beating.is_set():
            with open(path, "a"):
                pass
            os.utime(path)
        time.sleep(0.2)


threading.Thread(target=beat, daemon=True).start()
print(f"standin {mode} pid {os.getpid()} starting", flush=True)

if mode == "crash":
    print("standin: crashing on purpose", flush=True)
    sys.exit(1)
if mode == "crashif" and os.path.exists(sys.argv[2]):
    print("standin: crashing on purpose (the marker exists)", flush=True)
    sys.exit(1)
if mode == "bootfail":
    print("standin: cannot boot", flush=True)
    sys.exit(3)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.startswith("/slow"):
            time.sleep(float(self.path.partition("s=")[2] or 1))
        body = f'{{"pid": {os.getpid()}}}'.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def on_term(sig: int, frame: object) -> None:
    stop.set()


signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else on_term)

if mode == "http":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler)
    server.daemon_threads = False
    server.block_on_close = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"standin listening on {sys.argv[2]}", flush=True)
    stop.wait()
    server.shutdown()
    server.server_close()  # joins in-flight request threads
    sys.exit(0)
if mode == "hang":
    time.sleep(0.5)
    beating.clear()
stop.wait()
sys.exit(0)
