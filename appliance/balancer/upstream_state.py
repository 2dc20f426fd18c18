"""Upstream health as one transition table: healthy, unhealthy, ejected, draining.

Two kinds of evidence move an upstream between states:
  active checks   GET /health/ping every [balancer] health_interval; `health_fall`
                  failed checks in a row take it out (unhealthy), `health_rise`
                  passed checks in a row bring it back.
  passive counts  failures of real requests (refused, dropped, timed out):
                  `max_fails` within `fail_timeout` seconds eject it for
                  `fail_timeout` seconds, like nginx's max_fails/fail_timeout.
The supervisor's control channel drains an upstream (no new requests, in-flight
ones finish) or brings it back.

Only a healthy upstream gets traffic. `Health` turns evidence into events and
TRANSITIONS turns (state, event) into the next state; a pair missing from the
table changes nothing. Time is a parameter everywhere, so tests need no sleeps.
"""

from __future__ import annotations

HEALTHY = "healthy"
UNHEALTHY = "unhealthy"
EJECTED = "ejected"
DRAINING = "draining"

# Events: fall (active checks failed `fall` times in a row), rise (passed `rise` times),
# eject (max_fails passive failures within fail_timeout), expire (the ejection ran out),
# drain / undrain (the supervisor's control channel).
TRANSITIONS: dict[tuple[str, str], str] = {
    (HEALTHY, "fall"): UNHEALTHY,
    (HEALTHY, "eject"): EJECTED,
    (HEALTHY, "drain"): DRAINING,
    (UNHEALTHY, "rise"): HEALTHY,
    (UNHEALTHY, "drain"): DRAINING,
    (EJECTED, "expire"): HEALTHY,
    (EJECTED, "fall"): UNHEALTHY,
    (EJECTED, "drain"): DRAINING,
    (DRAINING, "undrain"): HEALTHY,
}


class Health:
    """The health state of one upstream and the evidence that moves it."""

    __slots__ = (
        "state",
        "rise",
        "fall",
        "max_fails",
        "fail_timeout",
        "ok_streak",
        "fail_streak",
        "fail_times",
        "ejected_until",
        "on_change",
    )

    def __init__(self, rise: int = 2, fall: int = 2, max_fails: int = 3, fail_timeout: float = 10.0, state: str = HEALTHY):
        self.state = state
        self.rise = rise
        self.fall = fall
        self.max_fails = max_fails
        self.fail_timeout = fail_timeout
        self.ok_streak = 0
        self.fail_streak = 0
        self.fail_times: list[float] = []
        self.ejected_until = 0.0
        self.on_change = None  # callable(old, new) run after every transition

    @property
    def up(self) -> bool:
        return self.state == HEALTHY

    def fire(self, event: str) -> bool:
        """Apply one event; True when the state changed."""
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            return False
        old, self.state = self.state, new
        if new == HEALTHY:
            self.fail_times.clear()
        if self.on_change is not None:
            self.on_change(old, new)
        return True

    def check_result(self, ok: bool, now: float) -> bool:
        """Record one active check; True when the state changed."""
        if ok:
            self.ok_streak += 1
            self.fail_streak = 0
            if self.ok_streak >= self.rise:
                return self.fire("rise")
            return False
        self.fail_streak += 1
        self.ok_streak = 0
        if self.fail_streak >= self.fall:
            return self.fire("fall")
        return False

    def passive_failure(self, now: float) -> bool:
        """Record one failed request; True when it ejected the upstream."""
        times = self.fail_times
        times.append(now)
        horizon = now - self.fail_timeout
        while times and times[0] <= horizon:
            times.pop(0)
        if len(times) >= self.max_fails and self.fire("eject"):
            self.ejected_until = now + self.fail_timeout
            return True
        return False

    def tick(self, now: float) -> bool:
        """Let time pass: an ejection that ran out ends."""
        if self.state == EJECTED and now >= self.ejected_until:
            return self.fire("expire")
        return False

    def drain(self) -> bool:
        return self.fire("drain")

    def undrain(self) -> bool:
        return self.fire("undrain")
