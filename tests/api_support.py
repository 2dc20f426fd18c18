"""Helpers for the API tests: in-process clients and real waitress workers.

`client_for(cfg)` builds the app in-process (falcon.testing) with response
checking on; `Worker` runs `appliance _child api` as a real process on its own
port and talks HTTP to it with `requests`.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from falcon import testing

from tests import procs

PASSWORD = "Correct-horse-9"
AUTH = {"bcrypt_rounds": 10, "min_password_length": 10}


def client_for(cfg: Any, **kw: Any) -> testing.TestClient:
    from appliance.api.app import create_app

    return testing.TestClient(create_app(cfg, check_responses=True, **kw))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def register(client: testing.TestClient, name: str, password: str = PASSWORD, role: str = "user") -> dict[str, Any]:
    """Create a user (admin directly through accounts) and return its public view."""
    if role == "admin":
        from appliance import accounts

        user = accounts.create_user(name, f"{name}@example.com", password, role="admin", rounds=10)
        return accounts.public_view(user)
    r = client.simulate_post("/auth/register", json={"username": name, "email": f"{name}@example.com", "password": password})
    assert r.status_code == 200, r.text
    return r.json["data"]["user"]


def login(client: testing.TestClient, name: str, password: str = PASSWORD, **extra: Any) -> dict[str, Any]:
    r = client.simulate_post("/auth/login", json={"username": name, "password": password, **extra})
    assert r.status_code == 200, r.text
    return r.json["data"]


def user_token(client: testing.TestClient, name: str, role: str = "user") -> str:
    register(client, name, role=role)
    return login(client, name)["access_token"]


@dataclass
class Worker:
    """A real api worker process on 127.0.0.1:port."""

    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=kw.pop("timeout", 10), **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return requests.post(self.url + path, timeout=kw.pop("timeout", 10), **kw)

    def put(self, path: str, **kw: Any) -> requests.Response:
        return requests.put(self.url + path, timeout=kw.pop("timeout", 10), **kw)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int:
        return procs.stop(self.proc)


def start_worker(cfg_path: Path, index: int = 0, env: dict[str, str] | None = None, wait: bool = True) -> Worker:
    """Start worker `index` of the config at cfg_path (its [api] base_port must be free)."""
    from appliance.config import load_config

    cfg = load_config(cfg_path, env={})
    port = cfg.api.base_port + index
    log = cfg_path.parent / f"api-{index}.log"
    proc = procs.start_child("api", cfg_path, index=index, env=env, log=log)
    worker = Worker(proc, port, log)
    if wait:
        try:
            procs.wait_port(port, proc=proc, timeout=30)
        except Exception:
            procs.stop(proc)
            raise RuntimeError(f"worker did not start:\n{worker.output()[-3000:]}") from None
    return worker


def worker_config(data_dir: Path, pg_url: str | None = None, **sections: dict[str, Any]) -> Path:
    """appliance.toml for real workers: a free base port, fast bcrypt, optional PostgreSQL."""
    from tests.conftest import write_config

    api = {"base_port": procs.free_port(8), "threads": 4, **sections.pop("api", {})}
    auth = {**AUTH, **sections.pop("auth", {})}
    if pg_url:
        sections.setdefault("database", {})["url"] = pg_url
    return write_config(data_dir, api=api, auth=auth, **sections)


class Relay:
    """A TCP relay on a fixed loopback port to a target; stop() cuts every connection, start() restores."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.port = procs.free_port()
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self._server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the relay thread on Linux
            self._server.close()
            self._server = None
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
