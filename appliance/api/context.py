"""What every route module gets: the ApiContext (one per worker) and the caller's Identity.

`ApiContext` holds the config, the database, the token settings, the
identity key, the revocation mirror and a lazily created task queue
(`appliance.tasks.broker.get_queue(cfg)`, made on first use). Route
modules and operator apps receive it in `register(app, ctx)` / `setup(app, ctx)`.

`Identity` is who the caller is, from the balancer's signed header or from a
bearer token the worker verified itself (see middleware.IdentityMiddleware).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import peewee as pw

from appliance import identity, revocation
from appliance.db.models import database
from appliance.tokens import TokenSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    """The authenticated caller."""

    user_id: int
    username: str
    role: str
    jti: str
    family: str
    generation: int
    expires: int
    source: str  # "balancer" (signed header) or "token" (verified here)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @classmethod
    def from_claims(cls, claims: dict[str, Any], source: str) -> Identity:
        return cls(
            user_id=int(claims["sub"]),
            username=str(claims.get("usr") or ""),
            role=str(claims.get("role") or "user"),
            jti=str(claims.get("jti") or ""),
            family=str(claims.get("fam") or ""),
            generation=int(claims.get("gen") or 0),
            expires=int(claims.get("exp") or 0),
            source=source,
        )

    def claims(self) -> dict[str, Any]:
        """The claim names the revocation checks use."""
        return {"sub": str(self.user_id), "jti": self.jti, "fam": self.family, "gen": self.generation}


@dataclass
class ApiContext:
    """Per-worker state shared by every route module (thread-safe to read)."""

    cfg: Any
    db: pw.Database | None = None
    index: int = 0
    check_responses: bool = False  # tests: every success body is checked against its declared schema
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.db is None:
            self.db = database.obj
        self.tokens = TokenSettings.from_config(self.cfg)
        self.identity_key = identity.key_bytes(self.cfg.secrets.identity_key)
        self.revocations = revocation.RevocationMirror()
        self.host = self.cfg.server.node_name or socket.gethostname()
        self.node_id = f"{self.host}:api:{self.index}"
        self._queue: Any = None
        self._queue_lock = threading.Lock()
        self._mirror_running = False
        self.warmups: list[Callable[[], Any]] = []  # run in threads of their own by start_background
        self.inflight = 0
        self.pool_stalled: Callable[[], bool] = lambda: False  # set by the server: api/inline.py
        self.draining = False
        self._inflight_lock = threading.Lock()

    def bind(self, db: pw.Database, index: int) -> None:
        """Make a context built in the template (app.prebuild) this worker's: its database and index."""
        self.db, self.index = db, index
        self.node_id = f"{self.host}:api:{index}"
        self.started = time.time()

    # --- revocation ---------------------------------------------------------------

    def start_background(self) -> None:
        """Start the revocation mirror's polling thread and the warmups (the server does; tests need not)."""
        for warmup in self.warmups:
            threading.Thread(target=warmup, name="warmup", daemon=True).start()
        self.warmups = []
        if not self._mirror_running:
            try:
                with self.db.connection_context():  # type: ignore[union-attr]
                    self.revocations.refresh()
            except Exception as exc:  # the poller retries; until then direct checks are used
                log.warning("revocation mirror cannot load yet: %s", exc)
            self.revocations.start(self.db)
            self._mirror_running = True

    def stop_background(self) -> None:
        self.revocations.stop()
        self._mirror_running = False

    def revoked(self, claims: dict[str, Any]) -> str | None:
        """The revocation reason of these token claims, or None.

        With the polling mirror running and healthy this is a dict lookup; otherwise
        (tests, or the mirror cannot reach the database) it asks the database.
        """
        if self._mirror_running and self.revocations.healthy:
            return self.revocations.is_revoked(claims)
        return revocation.check(claims)

    def revocations_changed(self) -> None:
        """This worker just wrote a revocation: see it at once, not after the next poll."""
        if self._mirror_running:
            try:
                self.revocations.refresh()
            except Exception:  # the poller catches up
                pass

    # --- queue --------------------------------------------------------------------

    @property
    def queue(self) -> Any:
        """The task queue (appliance.tasks.broker.get_queue(cfg)), created on first use."""
        if self._queue is None:
            with self._queue_lock:
                if self._queue is None:
                    from appliance.tasks import broker  # Huey loads only in a worker that queues

                    self._queue = broker.get_queue(self.cfg)
        return self._queue

    # --- in-flight accounting (graceful shutdown, concurrent_connections) -----------

    def enter(self) -> None:
        with self._inflight_lock:
            self.inflight += 1

    def leave(self) -> None:
        with self._inflight_lock:
            self.inflight -= 1
