"""Task callbacks end to end: a real worker process POSTs to real receivers on loopback.

Loopback is internal, so by default the worker refuses it (and says why in the task's log);
with 127.0.0.1/32 or a host name in [queue] callback_allow it delivers, signed as the README's
receiver checks (the test runs the README's own code). Redirects are not followed and proxy
variables are ignored. Only loopback addresses are used as targets here.
"""

from __future__ import annotations

import http.server
import re
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from appliance import addresses, outbound
from tests import procs
from tests.integration import test_tasks_support as support

README = Path(__file__).resolve().parents[2] / "README.md"


class Receiver:
    """A loopback HTTP server that records every request; paths choose the answer."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.got: list[dict[str, Any]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self._record(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

            def do_GET(self) -> None:
                self._record(b"")

            def _record(self, body: bytes) -> None:
                receiver.got.append({"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body})
                if self.path.startswith("/redirect"):
                    self.send_response(307)
                    self.send_header("Location", f"http://127.0.0.1:{receiver.port}/landed")
                elif self.path == "/flaky" and len(receiver.paths("/flaky")) == 1:
                    self.send_response(500)
                else:
                    self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def paths(self, path: str) -> list[dict[str, Any]]:
        return [g for g in self.got if g["path"] == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers():
    made: list[Receiver] = []

    def make(tls: ssl.SSLContext | None = None) -> Receiver:
        made.append(Receiver(tls))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture(params=support.BACKENDS)
def make_env(request, tmp_path):
    envs = []

    def make(**queue: Any) -> support.TaskEnv:
        envs.append(support.make_env(request.param, tmp_path / str(len(envs)), request, **queue))
        return envs[-1]

    yield make
    for env in envs:
        support.close_env(env)


def start_worker(env: support.TaskEnv, extra_env: dict[str, str] | None = None) -> None:
    """A real worker process of env's config (like TaskEnv.start, with extra environment variables)."""
    log = env.logdir / f"worker-{len(env.procs)}.log"
    proc = procs.start_child("worker", env.path, 0, env=extra_env, log=log)
    proc.log_path = log  # type: ignore[attr-defined]
    env.procs.append(proc)
    deadline = time.monotonic() + 20
    while "worker ready" not in log.read_text(errors="replace"):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.05)


def wait_for(check, env: support.TaskEnv, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, env.logs()
        time.sleep(0.05)
    return value


def task_log(env: support.TaskEnv, task_id: str, needle: str) -> str | None:
    lines = env.get(f"/tasks/logs/{task_id}", who="admin").json["data"]["logs"]
    return next((ln["line"] for ln in lines if needle in ln["line"]), None)


def readme_verify():
    """The receiver's verify() exactly as the README documents it."""
    text = README.read_text()
    section = text[text.index("## Task callbacks") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), scope)
    return scope["verify"]


def test_loopback_receivers_are_refused_by_default(make_env, receivers):
    env = make_env()
    rx = receivers()
    r = env.post("/tasks/submit", {"task_type": "sample", "callbacks": {"completion_url": f"{rx.base}/done"}})
    assert r.status_code == 400 and r.json["error"]["code"] == "callback_refused"
    assert r.json["error"]["details"]["field"] == "callbacks.completion_url" and "loopback" in r.json["error"]["message"]
    for host in ("localhost", "2130706433", "[::ffff:127.0.0.1]", "0x7f.1", "169.254.169.254", "10.0.0.1"):
        r = env.post("/tasks/submit", {"task_type": "sample", "callbacks": {"error_url": f"http://{host}:{rx.port}/e"}})
        assert r.status_code == 400 and r.json["error"]["details"]["field"] == "callbacks.error_url", host
    # the send-time check is the one that counts: a URL admitted while the API allowed loopback
    # (its callback_allow then, or a row written any other way) is refused by the worker
    env.cfg.queue.callback_allow = ["127.0.0.1/32"]
    tid = env.submit("sample", {"message": "x"}, callbacks={"completion_url": f"{rx.base}/done", "progress_url": f"{rx.base}/p"})
    start_worker(env)
    assert env.wait(tid)["status"] == "succeeded"  # a callback never fails its task
    line = wait_for(lambda: task_log(env, tid, "completion callback"), env)
    assert f"to {rx.base}/done not delivered: refused: 127.0.0.1 is a loopback address" in line, line
    assert wait_for(lambda: task_log(env, tid, "progress callback"), env)
    assert rx.got == []


def test_allowed_receivers_get_signed_callbacks_through_no_proxy(make_env, receivers):
    env = make_env(callback_allow=["127.0.0.1/32", "localhost"])
    rx, proxy = receivers(), receivers()
    proxies = {name: proxy.base for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")}
    start_worker(env, {**proxies, "no_proxy": "", "NO_PROXY": ""})
    done_url = f"http://localhost:{rx.port}/done?k=1"  # a host name allowed by name: Host stays the name
    ok_id = env.submit(
        "sample", {"duration": 0.4, "steps": 2}, callbacks={"progress_url": f"{rx.base}/progress", "completion_url": done_url}
    )
    bad_id = env.submit("sample", {"fail_times": 3}, callbacks={"error_url": f"{rx.base}/flaky"})
    env.wait(ok_id)
    env.wait(bad_id)
    wait_for(lambda: rx.paths("/done?k=1") and rx.paths("/progress") and len(rx.paths("/flaky")) == 2, env)
    assert proxy.got == []
    verify = readme_verify()
    secret = env.cfg.secrets.callback_secret
    sent_to = {"/done?k=1": done_url, "/progress": f"{rx.base}/progress", "/flaky": f"{rx.base}/flaky"}
    for got in rx.got:
        url = sent_to[got["path"]]
        assert got["method"] == "POST" and verify(secret, url, got["headers"], got["body"]), got
        assert outbound.verify(secret, url, got["body"], got["headers"]["X-Appliance-Timestamp"], got["headers"]["X-Appliance-Signature"])
        assert not verify(secret, url + "x", got["headers"], got["body"])  # bound to its URL
        assert not verify("y" * 32, url, got["headers"], got["body"])
    done = rx.paths("/done?k=1")[0]
    assert done["headers"]["Host"] == f"localhost:{rx.port}"
    assert rx.paths("/progress")[0]["headers"]["Host"] == f"127.0.0.1:{rx.port}"
    body = orjson.loads(done["body"])
    assert body["task_id"] == ok_id and body["status"] == "succeeded" and body["event"] == "completion"
    assert done["headers"]["X-Appliance-Event"] == "completion"
    flaky = [orjson.loads(g["body"]) for g in rx.paths("/flaky")]
    assert flaky[-1]["task_id"] == bad_id and flaky[-1]["status"] == "failed"  # retried after a 500
    assert orjson.loads(rx.paths("/progress")[0]["body"])["progress"]["percentage"] in (50.0, 100.0)
    assert task_log(env, ok_id, "not delivered") is None


def test_a_redirect_is_a_failed_delivery_not_followed(make_env, receivers):
    env = make_env(callback_allow=["127.0.0.1/32"])
    rx = receivers()
    start_worker(env)
    tid = env.submit("sample", callbacks={"completion_url": f"{rx.base}/redirect"})
    env.wait(tid)
    line = wait_for(lambda: task_log(env, tid, "completion callback"), env)
    assert "not delivered: HTTP 307: redirects are not followed" in line, line
    assert [g["path"] for g in rx.got] == ["/redirect"]  # once: no retry, and /landed never asked


def test_the_post_goes_to_the_address_that_was_vetted(receivers):
    """One resolution per try, and the connection goes to its answer: a second DNS answer (rebinding) is never asked for."""
    rx = receivers()
    asked: list[str] = []

    def resolver(host, port, *args, **kw):  # a DNS answer for a name the system resolver does not know
        asked.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    url = f"http://hooks.rebind.test:{rx.port}/done"
    allow = addresses.Policy.from_entries(["127.0.0.1/32"])
    assert outbound.post(url, b"{}", "s" * 32, "completion", 5.0, 0, allow, resolver=resolver) is None
    assert asked == ["hooks.rebind.test"] and rx.got[0]["headers"]["Host"] == f"hooks.rebind.test:{rx.port}"
    # the same name answering with loopback under the default policy: refused, nothing sent, not retried
    why = outbound.post(url, b"{}", "s" * 32, "completion", 5.0, 3, addresses.Policy(), resolver=resolver)
    assert why == "refused: hooks.rebind.test resolves to 127.0.0.1, a loopback address (allow it with [queue] callback_allow)"
    assert len(rx.got) == 1 and asked == ["hooks.rebind.test"] * 2


def test_https_callbacks_check_the_certificate_against_the_name(receivers, tmp_path, monkeypatch):
    """Connecting to the vetted address keeps TLS honest: SNI and the certificate check use the URL's name."""
    from appliance.balancer.certs import make_self_signed

    cert, key = make_self_signed("hooks.tls.test")
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    server_names: list[str | None] = []
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    tls.sni_callback = lambda sock, name, ctx: server_names.append(name)
    rx = receivers(tls)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "cert.pem"))  # this test's CA: the self-signed certificate
    monkeypatch.setattr(outbound, "_tls", None)  # the client context is made once per process: make it again

    def resolver(host, port, *args, **kw):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    allow = addresses.Policy.from_entries(["127.0.0.1/32"])
    good = f"https://hooks.tls.test:{rx.port}/done"
    assert outbound.post(good, b"{}", "s" * 32, "completion", 5.0, 0, allow, resolver=resolver) is None
    assert server_names == ["hooks.tls.test"] and rx.got[0]["headers"]["Host"] == f"hooks.tls.test:{rx.port}"
    why = outbound.post(f"https://other.tls.test:{rx.port}/done", b"{}", "s" * 32, "completion", 5.0, 0, allow, resolver=resolver)
    assert why is not None and "CERTIFICATE_VERIFY_FAILED" in why and len(rx.got) == 1, why
