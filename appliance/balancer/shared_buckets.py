"""Rate-limit buckets shared by the balancer processes of one host ([balancer] processes > 1, no Redis).

Each balancer process maps the same small file, <data_dir>/run/rate-limits.buckets, and keeps
every bucket (the zone's excess and the time of the last accepted request, the arithmetic of
limiter.py) in a fixed slot of it, so a limit holds for the host however the kernel spreads
connections over the processes. One decision takes an exclusive flock on the file (two system
calls, about a microsecond), reads, checks and charges every matching zone, and lets go: two
processes never admit on the same excess.

Layout: a 16-byte header (magic, slot count), then `slots` slots of 32 bytes:
    u64 key hash (0 = empty), u32 zone index, u32 unused, f64 excess (milli-requests), f64 last (ms)
A key lives in one of PROBE consecutive slots from its hash; a new key takes an empty slot there,
else one whose bucket has fully drained (it behaves exactly like a new key), else the least
recently used. Times are CLOCK_MONOTONIC, which every process of the host shares; the supervisor
removes the file when it starts (contract.RATE_LIMIT_FILE), and a slot time ahead of the clock
(a file of an earlier boot) counts as empty.

With one balancer process, limiter.build keeps the in-memory RateLimiter: nothing is shared, so
nothing is locked.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from appliance.balancer.limiter import _ONE, Decision, _combine, _compile, _Zone, matching_zones
from appliance.config import RateLimitZone
from appliance.contract import RATE_LIMIT_FILE, RUN_DIR

MAGIC = b"APLRLB01"
HEADER = struct.Struct("<8sQ")
SLOT = struct.Struct("<QIIdd")
PROBE = 8  # slots a key may live in: a bounded scan per decision
MIN_SLOTS = 1024
_blake2b = hashlib.blake2b
_from_bytes = int.from_bytes


def slots_for(max_keys: int) -> int:
    """A power of two with room for `max_keys` keys per zone at half load."""
    want = max(MIN_SLOTS, 2 * max_keys)
    return 1 << (want - 1).bit_length()


def key_hash(zone: int, key: str) -> int:
    """64 bits of the zone and the bucket key, never 0 (the empty slot); the same in every process.

    A cryptographic hash: a client cannot pick a name whose bucket is another's."""
    h = _from_bytes(_blake2b(b"%d\0%s" % (zone, key.encode()), digest_size=8).digest(), "little")
    return h or 1


class SharedBuckets:
    """The mapped file: open (creating it under the lock when absent), locked decisions, close."""

    def __init__(self, path: Path, slots: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            if os.fstat(self.fd).st_size < HEADER.size:
                os.ftruncate(self.fd, HEADER.size + slots * SLOT.size)
                os.pwrite(self.fd, HEADER.pack(MAGIC, slots), 0)
            magic, existing = HEADER.unpack(os.pread(self.fd, HEADER.size, 0))
            if magic != MAGIC or existing <= 0 or existing & (existing - 1):
                raise ValueError(f"{path} is not a rate-limit bucket file; remove it (the supervisor does at start)")
            self.slots = existing  # the file's own size wins: a process started with another max_keys shares it
            self.map = mmap.mmap(self.fd, HEADER.size + self.slots * SLOT.size)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        self.mask = self.slots - 1

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class SharedRateLimiter:
    """RateLimiter's interface (a synchronous `decide`) over SharedBuckets: one limit per host."""

    def __init__(
        self,
        zones: Sequence[RateLimitZone],
        path: Path,
        max_keys: int = 100000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.zones = _compile(zones)
        self.clock = clock
        self.store = SharedBuckets(path, slots_for(max_keys))

    @classmethod
    def for_config(cls, cfg: Any, clock: Callable[[], float] | None = None) -> SharedRateLimiter:
        """The zones of [rate_limits] on the host's bucket file in the run dir."""
        rl = cfg.rate_limits
        return cls(rl.zones, cfg.path(f"{RUN_DIR}/{RATE_LIMIT_FILE}"), rl.max_keys, clock=clock or time.monotonic)

    def decide(self, method: str, path: str, address: str, user: str | None) -> Decision | None:
        """The verdict for one request, or None when no zone applies. `path` is without the query."""
        first, more = matching_zones(self.zones, method, path)
        if first is None:
            return None
        if more is None:
            return self._decide_one(first, key_hash(first.index, first.bucket_key(address, user)))
        return self._decide_many(more, [key_hash(z.index, z.bucket_key(address, user)) for z in more])

    def _decide_one(self, z: _Zone, h: int) -> Decision:
        # The common case, one zone: lock, read, decide, charge, unlock.
        fd = self.store.fd
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            now_ms = self.clock() * 1000.0
            offset, cand = self._find(z, h, now_ms, ())
            if cand > z.burst_milli:
                return z.refused(cand)
            SLOT.pack_into(self.store.map, offset, h, z.index, 0, cand, now_ms)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return z.accepted(cand)

    def _decide_many(self, zones: list[_Zone], hashes: list[int]) -> Decision:
        # Check every zone first, charge them only when all accept (a refusal costs no zone anything).
        fd, buf = self.store.fd, self.store.map
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            now_ms = self.clock() * 1000.0
            found: list[tuple[int, float]] = []
            for z, h in zip(zones, hashes, strict=True):
                found.append(self._find(z, h, now_ms, [offset for offset, _ in found]))
            cands = [cand for _, cand in found]
            if all(cand <= z.burst_milli for z, cand in zip(zones, cands, strict=True)):
                for z, h, (offset, cand) in zip(zones, hashes, found, strict=True):
                    SLOT.pack_into(buf, offset, h, z.index, 0, cand, now_ms)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return _combine(zones, cands)

    def _find(self, z: _Zone, h: int, now_ms: float, taken: Sequence[int]) -> tuple[int, float]:
        """(offset of the key's slot, or of the slot it would take; its candidate excess with this request).

        `taken`: slots another zone of the same request already holds (never handed out twice)."""
        buf, mask, unpack = self.store.map, self.store.mask, SLOT.unpack_from
        start = h & mask
        free = -1
        oldest, oldest_t = -1, float("inf")
        for i in range(PROBE):
            offset = HEADER.size + ((start + i) & mask) * SLOT.size
            slot_h, zone, _, excess, last = unpack(buf, offset)
            if slot_h == h and zone == z.index:
                if last > now_ms + _ONE:  # a time from another clock (an earlier boot): as new
                    return offset, 0.0
                cand = excess - z.rate * max(0.0, now_ms - last) + _ONE
                return offset, cand if cand > 0.0 else 0.0
            if free < 0 and offset not in taken:
                if slot_h == 0 or last > now_ms + _ONE or self._drained(zone, excess, now_ms - last):
                    free = offset
                elif last < oldest_t:
                    oldest, oldest_t = offset, last
        return (free if free >= 0 else oldest), 0.0

    def _drained(self, zone: int, excess: float, elapsed: float) -> bool:
        # A bucket a request would find empty is as good as absent (limiter.RateLimiter._expire).
        if zone >= len(self.zones):
            return True  # a zone the config no longer has
        return excess - self.zones[zone].rate * elapsed + _ONE <= 0.0

    def close(self) -> None:
        self.store.close()
