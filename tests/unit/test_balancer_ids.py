"""Request ids and trace ids the proxy makes: random hex from a pooled os.urandom, never repeated."""

from __future__ import annotations

import re

from appliance.balancer import proxy


def test_generated_ids_are_hex_and_unique_across_pool_refills() -> None:
    n = proxy._ID_POOL_BYTES // 24 * 3 + 7  # crosses several refills
    ids = [proxy._random_hex48() for _ in range(n)]
    assert all(re.fullmatch(rb"[0-9a-f]{48}", i) for i in ids)
    assert len(set(ids)) == n
    trace = b"00-" + ids[0][:32] + b"-" + ids[0][32:] + b"-01"
    assert proxy.valid_traceparent(trace)
