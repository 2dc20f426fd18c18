"""Restart backoff and crash-loop detection: pure logic, time as a parameter."""

from appliance.supervisor.policy import RestartPolicy, RestartTracker


def crash(tracker: RestartTracker, at: float, up_for: float = 0.1):
    return tracker.on_exit(now=at, started_at=at - up_for)


def test_first_restart_is_immediate_then_doubles_to_the_cap():
    t = RestartTracker(RestartPolicy(max_restarts=100, window=1000, stable_after=10))
    delays = [crash(t, at=float(i)).delay for i in range(9)]
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_streak_resets_after_staying_up():
    t = RestartTracker(RestartPolicy(max_restarts=100, window=1000, stable_after=10))
    assert [crash(t, at=float(i)).delay for i in range(3)] == [0.0, 1.0, 2.0]
    assert crash(t, at=100.0, up_for=50.0).delay == 0.0
    assert crash(t, at=101.0).delay == 1.0


def test_crash_loop_gives_up_after_max_restarts_within_window():
    t = RestartTracker(RestartPolicy(max_restarts=5, window=60))
    decisions = [crash(t, at=float(i)) for i in range(6)]
    assert [d.give_up for d in decisions] == [False] * 5 + [True]
    assert decisions[-1].deaths_in_window == 6


def test_deaths_outside_the_window_are_forgotten():
    t = RestartTracker(RestartPolicy(max_restarts=2, window=10))
    assert not crash(t, at=0.0).give_up
    assert not crash(t, at=5.0).give_up
    assert not crash(t, at=30.0).give_up  # the first two fell out of the window
    assert not crash(t, at=31.0).give_up
    assert crash(t, at=32.0).give_up


def test_reset_forgets_everything():
    t = RestartTracker(RestartPolicy(max_restarts=1, window=60))
    crash(t, at=0.0)
    t.reset()
    d = crash(t, at=1.0)
    assert not d.give_up and d.delay == 0.0


def test_policy_from_config(make_config):
    cfg = make_config(supervisor={"max_restarts": 3, "restart_window": 5.0})
    policy = RestartPolicy.from_config(cfg)
    assert (policy.max_restarts, policy.window, policy.stable_after) == (3, 5.0, 5.0)
