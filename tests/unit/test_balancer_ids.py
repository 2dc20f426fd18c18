"""Request ids and trace ids the proxy makes: random hex from a pooled os.urandom, never repeated."""

from __future__ import annotations

import re

from appliance.balancer import ids


def test_generated_ids_are_hex_and_unique_across_pool_refills() -> None:
    n = ids.ID_POOL_BYTES // 24 * 3 + 7  # crosses several refills
    made = [ids.random_hex48() for _ in range(n)]
    assert all(re.fullmatch(rb"[0-9a-f]{48}", i) for i in made)
    assert len(set(made)) == n
    trace = b"00-" + made[0][:32] + b"-" + made[0][32:] + b"-01"
    assert ids.valid_traceparent(trace)


def test_the_clients_ids_are_kept_when_valid_and_replaced_when_not() -> None:
    good_trace = b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"
    assert ids.request_ids({b"x-request-id": b"my.id-1", b"traceparent": good_trace}) == (b"my.id-1", good_trace)
    rid, trace = ids.request_ids({})
    assert re.fullmatch(rb"[0-9a-f]{32}", rid) and ids.valid_traceparent(trace) and trace[3:35] == rid
    for bad in (b"ff-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01", b"00-" + b"0" * 32 + b"-" + b"b" * 16 + b"-01", b"junk"):
        rid, trace = ids.request_ids({b"x-request-id": b"bad id!", b"traceparent": bad})
        assert re.fullmatch(rb"[0-9a-f]{32}", rid) and ids.valid_traceparent(trace) and trace != bad
    rid, trace = ids.request_ids({b"traceparent": good_trace})
    assert trace == good_trace and re.fullmatch(rb"[0-9a-f]{32}", rid)
