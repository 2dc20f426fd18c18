"""When to restart a dead child, and when to give up on it (pure logic; time is a parameter).

A child that dies is restarted after a delay that grows with each crash in a
row: the first restart is immediate (a child that ran fine for a while and
died once should be back at once), then 1 s, 2 s, 4 s ... capped at 30 s. A
child that stays up for `stable_after` seconds has its streak reset. Deaths
are also counted in a sliding window: more than `max_restarts` deaths within
`window` seconds is a crash loop, and the child is given up (marked failed)
while the rest keep serving.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5
    window: float = 60.0
    base_delay: float = 1.0
    max_delay: float = 30.0
    stable_after: float = 10.0

    @classmethod
    def from_config(cls, cfg: object) -> RestartPolicy:
        sup = cfg.supervisor  # type: ignore[attr-defined]
        return cls(max_restarts=sup.max_restarts, window=sup.restart_window, stable_after=min(10.0, sup.restart_window))


@dataclass(frozen=True)
class Decision:
    give_up: bool
    delay: float
    deaths_in_window: int


@dataclass
class RestartTracker:
    """The restart history of one child slot."""

    policy: RestartPolicy
    deaths: deque[float] = field(default_factory=deque)
    streak: int = 0

    def on_exit(self, now: float, started_at: float) -> Decision:
        """Record a death at `now` of a process started at `started_at`; say what to do."""
        if now - started_at >= self.policy.stable_after:
            self.streak = 0
        self.deaths.append(now)
        while self.deaths and self.deaths[0] < now - self.policy.window:
            self.deaths.popleft()
        if len(self.deaths) > self.policy.max_restarts:
            return Decision(give_up=True, delay=0.0, deaths_in_window=len(self.deaths))
        delay = 0.0 if self.streak == 0 else min(self.policy.max_delay, self.policy.base_delay * 2 ** (self.streak - 1))
        self.streak += 1
        return Decision(give_up=False, delay=delay, deaths_in_window=len(self.deaths))

    def reset(self) -> None:
        """Forget the history (an operator asked for a fresh start, e.g. SIGHUP)."""
        self.deaths.clear()
        self.streak = 0
