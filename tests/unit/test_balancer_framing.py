"""The balancer's HTTP framing against a corpus of valid and smuggling requests, plus a fuzz target.

Each corpus file under corpus/valid and corpus/invalid starts with "# key: value"
lines (a "# source:" line says where a case came from, see corpus/SOURCES.md), then the message; literal newlines in the file are ignored and escapes
(\\r\\n, \\x00) are decoded, so every byte of a vector is visible. Each file is
replayed whole, byte by byte, line by line and in random chunks: framing must
not depend on how the bytes arrive.
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.balancer.framing import (
    CAPTURE,
    DROP,
    REQUEST_ROLES,
    RESPONSE_ROLES,
    ProtocolError,
    RequestFramer,
    ResponseFramer,
    ResponseHead,
    canonical_path,
)

CORPUS = Path(__file__).parent / "corpus"


def load(path: Path) -> tuple[dict[str, str], bytes]:
    meta: dict[str, str] = {}
    body: list[str] = []
    for line in path.read_text("utf-8").splitlines():
        if line.startswith("# ") and not body and ":" in line:
            key, _, value = line[2:].partition(":")
            meta[key.strip()] = value.strip()
        elif line.startswith("#") and not body:
            continue
        else:
            body.append(line)
    return meta, codecs.escape_decode("".join(body).encode("utf-8"))[0]


class Recorder:
    """A handler that records what the framer delivers and answers each request at once."""

    def __init__(self) -> None:
        self.heads: list = []
        self.bodies: list[bytearray] = []
        self.ends = 0
        self.framer: RequestFramer | None = None

    def on_request(self, head) -> None:
        self.heads.append(head)
        self.bodies.append(bytearray())

    def on_body(self, data: bytes) -> None:
        self.bodies[-1] += data

    def on_request_end(self) -> None:
        self.ends += 1


def replay(data: bytes, pieces: list[bytes] | None = None, **kw) -> Recorder:
    rec = Recorder()
    framer = RequestFramer(rec, **kw)
    for piece in pieces if pieces is not None else [data]:
        framer.feed(piece)
        while framer.busy:  # answer pipelined requests as they come
            framer.release()
    return rec


def splits(data: bytes, seed: int) -> dict[str, list[bytes]]:
    rnd = random.Random(seed)
    chunks, i = [], 0
    while i < len(data):
        n = rnd.randint(1, 9)
        chunks.append(data[i : i + n])
        i += n
    lines = [line for line in data.splitlines(keepends=True)]
    return {"whole": [data], "bytes": [data[i : i + 1] for i in range(len(data))], "lines": lines, "random": chunks}


VALID = sorted((CORPUS / "valid").glob("*.http"))
INVALID = sorted((CORPUS / "invalid").glob("*.http"))


def test_corpus_is_there() -> None:
    assert len(VALID) >= 40 and len(INVALID) >= 95


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
@pytest.mark.parametrize("mode", ["whole", "bytes", "lines", "random"])
def test_valid(path: Path, mode: str) -> None:
    meta, data = load(path)
    rec = replay(data, splits(data, hash(path.stem) & 0xFFFF)[mode])
    assert len(rec.heads) == int(meta["requests"]) == rec.ends
    if "paths" in meta:
        assert [h.target.split(b"?")[0].decode() for h in rec.heads] == meta["paths"].split()
    if "body" in meta:
        assert bytes(rec.bodies[0]) == meta["body"].encode()
    if "keep_alive" in meta:
        assert rec.heads[0].keep_alive is (meta["keep_alive"] == "true")
    if "expect" in meta:
        assert rec.heads[0].expect == meta["expect"].encode()
    names = {n for head in rec.heads for n, _ in head.headers}
    for absent in meta.get("absent", "").split():
        assert absent.encode() not in names, absent
    for present in meta.get("present", "").split():
        assert present.encode() in names, present
    for head in rec.heads:
        assert all(n == n.lower() for n, _ in head.headers)


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
@pytest.mark.parametrize("mode", ["whole", "bytes", "lines", "random"])
def test_invalid(path: Path, mode: str) -> None:
    meta, data = load(path)
    with pytest.raises(ProtocolError) as info:
        replay(data, splits(data, hash(path.stem) & 0xFFFF)[mode])
    assert info.value.status == int(meta["status"])


def test_head_too_large_is_431_even_when_unfinished() -> None:
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 5000
    with pytest.raises(ProtocolError) as info:
        replay(data, max_header_bytes=2048)
    assert info.value.status == 431
    with pytest.raises(ProtocolError) as info:
        replay(data + b"\r\n\r\n", [data[:1000], data[1000:] + b"\r\n\r\n"], max_header_bytes=2048)
    assert info.value.status == 431


def test_body_limit_is_413_for_length_and_chunked() -> None:
    with pytest.raises(ProtocolError) as info:
        replay(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n", max_body_bytes=10)
    assert info.value.status == 413
    chunked = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n"
    with pytest.raises(ProtocolError) as info:
        replay(chunked, max_body_bytes=10)
    assert info.value.status == 413


def test_pipelined_requests_wait_for_release() -> None:
    rec = Recorder()
    framer = RequestFramer(rec)
    framer.feed(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nPOST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
    assert [h.path for h in rec.heads] == [b"/a"] and rec.ends == 1 and framer.backlog_bytes == 2
    framer.release()
    assert [h.path for h in rec.heads] == [b"/a", b"/b"] and bytes(rec.bodies[1]) == b"hi" and rec.ends == 2
    assert framer.busy and framer.idle


def test_roles_capture_and_drop() -> None:
    from appliance.balancer.framing import CAPTURE, DROP, REQUEST_ROLES

    roles = {**REQUEST_ROLES, b"x-request-id": CAPTURE, b"x-appliance-identity": DROP}
    rec = replay(
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-ID: abc\r\nX-Request-ID: def\r\nX-Appliance-Identity: forged\r\nX-User-Id: 1\r\n\r\n",
        roles=roles,
        drop_prefixes=(b"proxy-", b"x-user-"),
    )
    head = rec.heads[0]
    assert head.captured == {b"x-request-id": b"abc"}
    assert [n for n, _ in head.headers] == [b"host"]


class ResponseRecorder:
    def __init__(self) -> None:
        self.heads: list[ResponseHead] = []
        self.body = bytearray()
        self.ends = 0

    def on_response(self, head: ResponseHead) -> None:
        self.heads.append(head)

    def on_response_body(self, data: bytes) -> None:
        self.body += data

    def on_response_end(self) -> None:
        self.ends += 1

    def on_whole_response(self, head: ResponseHead, body: bytes) -> None:
        self.on_response(head)
        self.on_response_body(body)
        self.on_response_end()


def test_response_chunked_interim_and_head() -> None:
    rec = ResponseRecorder()
    framer = ResponseFramer(rec)
    framer.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\nX-A: 1\r\n\r\n")
    framer.feed(b"3\r\nabc\r\n0\r\n\r\n")
    assert [h.status for h in rec.heads] == [200] and rec.heads[0].chunked and bytes(rec.body) == b"abc" and rec.ends == 1
    assert [n for n, _ in rec.heads[0].headers] == [b"X-A"]
    framer.reset(head_request=True)
    framer.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert rec.ends == 2 and rec.heads[1].no_body and rec.heads[1].content_length == 10
    framer.reset(head_request=False)
    framer.feed(b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert rec.ends == 4 and bytes(rec.body).endswith(b"ok")


def test_response_close_delimited() -> None:
    rec = ResponseRecorder()
    framer = ResponseFramer(rec)
    framer.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nstream")
    assert rec.ends == 0 and framer.feed_eof() and rec.ends == 1 and bytes(rec.body) == b"stream"


VALID_SAMPLES = [load(p)[1] for p in VALID]


def _mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    b = bytearray(data)
    for kind, pos, val in ops:
        if not b:
            break
        pos %= len(b)
        if kind == 0:
            b[pos] = val
        elif kind == 1:
            b.insert(pos, val)
        else:
            del b[pos]
    return bytes(b)


def _feed_all(data: bytes, cut: int) -> None:
    try:
        replay(data, [data[:cut], data[cut:]], max_header_bytes=4096, max_body_bytes=1 << 20)
    except ProtocolError as exc:
        assert 400 <= exc.status < 500


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(VALID_SAMPLES),
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    st.integers(0, 400),
)
def test_fuzz_mutated_requests_parse_or_4xx(sample: bytes, ops, cut: int) -> None:
    _feed_all(_mutate(sample, ops), cut)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 300))
def test_fuzz_random_bytes_parse_or_4xx(data: bytes, cut: int) -> None:
    _feed_all(data, cut)


def test_header_name_caches_are_per_role_table() -> None:
    # Names are remembered per role table as spelled; another table (even a short-lived one) never sees them.
    dropping = {**REQUEST_ROLES, b"x-secret": DROP}
    capturing = {**REQUEST_ROLES, b"x-secret": CAPTURE}
    raw = b"GET / HTTP/1.1\r\nHost: a\r\nX-Secret: s\r\nX-Other: o\r\n\r\n"
    for _ in range(3):
        a = RequestFramer(Recorder(), roles=dropping)
        a.feed(raw)
        head = a.handler.heads[0]
        assert [n for n, _ in head.headers] == [b"host", b"x-other"] and head.captured == {}
        b = RequestFramer(Recorder(), roles=capturing)
        b.feed(raw)
        head = b.handler.heads[0]
        assert [n for n, _ in head.headers] == [b"host", b"x-other"] and head.captured == {b"x-secret": b"s"}
        c = RequestFramer(Recorder(), roles={**REQUEST_ROLES, b"x-secret": CAPTURE})  # a new table object each round
        c.feed(raw.replace(b"X-Secret", b"x-SECRET"))
        assert c.handler.heads[0].captured == {b"x-secret": b"s"}
    # proxy- prefixed names are dropped whatever their spelling, also once remembered
    for _ in range(2):
        d = RequestFramer(Recorder())
        d.feed(b"GET / HTTP/1.1\r\nHost: a\r\nProxy-Foo: 1\r\nPROXY-foo: 2\r\n\r\n")
        assert [n for n, _ in d.handler.heads[0].headers] == [b"host"]
    rec = ResponseRecorder()
    r = ResponseFramer(rec, roles={**RESPONSE_ROLES, b"x-request-id": DROP})
    for _ in range(2):
        r.reset(head_request=False)
        r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Request-ID: up\r\nProxy-X: 1\r\nX-A: 1\r\n\r\n")
    assert [n for n, _ in rec.heads[-1].headers] == [b"Content-Length", b"X-A"]
    # Short-lived tables one after another (ids could be reused once freed): each keeps its own roles.
    for role in (DROP, CAPTURE, DROP, CAPTURE):
        f = RequestFramer(Recorder(), roles={**REQUEST_ROLES, b"x-secret": role})
        f.feed(raw)
        assert (f.handler.heads[0].captured == {b"x-secret": b"s"}) == (role == CAPTURE)
        del f


def test_pipelined_head_over_the_limit_is_431_although_it_came_in_one_read() -> None:
    rec = Recorder()
    framer = RequestFramer(rec, max_header_bytes=1024)
    small = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"
    big = b"GET /b HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 90) for i in range(12)) + b"\r\n"
    assert len(big) > 1024
    framer.feed(small + big)  # the first request is answered before the second is refused
    assert len(rec.heads) == 1 and rec.ends == 1
    with pytest.raises(ProtocolError) as err:
        framer.release()
    assert err.value.status == 431 and len(rec.heads) == 1
    ok = RequestFramer(Recorder(), max_header_bytes=1024)
    fits = b"GET /b HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 90) for i in range(5)) + b"\r\n"
    ok.feed(small + fits)  # under the limit: the second waits (pipelined) behind the first
    assert len(ok.handler.heads) == 1 and ok._backlog


# -- heads remembered by their bytes -----------------------------------------------------------------


def _deliveries(framer_factory, pieces: list[bytes]) -> list:
    """What a framer delivers for `pieces` (heads as comparable tuples), or the error it raised."""
    rec = Recorder()
    framer = framer_factory(rec)
    out: list = []
    try:
        for piece in pieces:
            framer.feed(piece)
            while framer.busy:
                framer.release()
    except ProtocolError as exc:
        out.append(("error", exc.status, exc.message))
    for head, body in zip(rec.heads, rec.bodies, strict=True):
        out.append(
            (
                head.method,
                head.target,
                head.path,
                head.version,
                head.keep_alive,
                list(head.headers),
                dict(head.captured),
                head.host,
                head.content_length,
                head.chunked,
                head.expect,
                bytes(body),
            )
        )
    return out + [("ends", rec.ends)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(VALID_SAMPLES + [load(p)[1] for p in INVALID]), min_size=1, max_size=4),
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10_000), st.integers(0, 255)), max_size=3),
)
def test_a_remembered_head_is_delivered_as_a_fresh_parse_would(samples: list[bytes], ops) -> None:
    # Each message is sent as its own read, twice over (the second time the heads are remembered),
    # and once more to a framer whose cache was filled by other framers: every delivery is the same.
    roles = {**REQUEST_ROLES, b"x-request-id": CAPTURE}  # a table of this test's own: a cache of its own
    reads = [_mutate(s, ops) for s in samples]

    def framer(rec):
        return RequestFramer(rec, roles=roles, max_header_bytes=4096, max_body_bytes=1 << 20)

    first = [_deliveries(framer, [r]) for r in reads]
    again = [_deliveries(framer, [r]) for r in reads]
    assert again == first
    together = _deliveries(framer, reads)  # one connection, read after read
    cold = _deliveries(lambda rec: RequestFramer(rec, roles={**roles}, max_header_bytes=4096, max_body_bytes=1 << 20), reads)
    assert together == cold


def test_only_whole_keep_alive_requests_without_a_body_are_remembered() -> None:
    roles = {**REQUEST_ROLES}
    cases = {
        b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n": True,
        b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n": False,
        b"GET /a HTTP/1.0\r\nHost: a\r\n\r\n": False,
        b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi": False,
        b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nExpect: 100-continue\r\n\r\n": False,
        b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n": False,  # two in one read
        b"GET /a HTTP/1.1\r\nHost: a\r\n": False,  # not whole
    }
    for raw, remembered in cases.items():
        framer = RequestFramer(Recorder(), roles=roles)
        framer.feed(raw)
        assert (raw in framer._heads) is remembered, raw
    bad = b"GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"
    with pytest.raises(ProtocolError):
        RequestFramer(Recorder(), roles=roles).feed(bad)
    assert bad not in RequestFramer(Recorder(), roles=roles)._heads


def test_the_head_cache_is_bounded() -> None:
    from appliance.balancer import framing

    framer = RequestFramer(Recorder(), roles={**REQUEST_ROLES})
    for i in range(framing.HEAD_CACHE_SIZE * 2 + 5):
        framer.feed(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
        framer.release()
    assert 0 < len(framer._heads) <= framing.HEAD_CACHE_SIZE


ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Request-ID: %s\r\nX-A: 1\r\n\r\nhello"


def _answer_framer(rec, roles: dict[bytes, int] | None = None) -> ResponseFramer:
    # A role table of its own is a cache of its own: the same table object shares one.
    roles = roles if roles is not None else {**RESPONSE_ROLES, b"x-request-id": DROP}
    return ResponseFramer(rec, roles=roles, volatile=b"x-request-id")


def test_an_answer_head_is_remembered_without_its_request_id() -> None:
    rec = ResponseRecorder()
    framer = _answer_framer(rec)
    for rid in (b"one", b"two", b"three"):
        framer.reset(head_request=False)
        framer.feed(ANSWER % rid)
    assert rec.ends == 3 and bytes(rec.body) == b"hello" * 3
    assert rec.heads[1] is rec.heads[0] is rec.heads[2]  # parsed once
    assert rec.heads[0].headers == [(b"Content-Length", b"5"), (b"X-A", b"1")]
    # A request id that is not a plain token is part of the key: that answer is parsed (and refused here).
    framer.reset(head_request=False)
    with pytest.raises(ProtocolError):
        framer.feed(ANSWER % b"bad\x01id")
    with pytest.raises(ValueError):
        ResponseFramer(rec, volatile=b"x-a")  # only a dropped header may be left out of the key


def test_a_remembered_answer_split_over_reads_is_delivered_as_it_comes() -> None:
    rec = ResponseRecorder()
    framer = _answer_framer(rec)
    framer.feed(ANSWER % b"first")
    whole = ANSWER % b"second"
    framer.reset(head_request=False)
    framer.feed(whole[:-3])
    assert len(rec.heads) == 2 and rec.ends == 1 and rec.heads[1] is rec.heads[0]  # the head went on at once
    assert framer.feed_eof() is False  # the upstream closing now would cut it short
    framer.feed(whole[-3:-1])
    framer.feed(whole[-1:] + b"HTTP/1.1 204 No Content\r\n\r\n")  # the end, and what follows it
    assert rec.ends == 3 and bytes(rec.body) == b"hellohello" and rec.heads[2].status == 204


def _answer_events(reads: list[bytes], warm: list[bytes]) -> list:
    rec = ResponseRecorder()
    roles = {**RESPONSE_ROLES, b"x-request-id": DROP}  # this run's own cache
    for raw in warm:  # other connections' answers, remembered before
        other = _answer_framer(ResponseRecorder(), roles)
        with contextlib.suppress(ProtocolError):
            other.feed(raw)
    if warm:
        assert _answer_framer(rec, roles)._heads, "nothing was remembered: this test would prove nothing"
    framer = _answer_framer(rec, roles)
    events: list = []
    try:
        for read in reads:
            framer.feed(read)
            events.append((len(rec.heads), bytes(rec.body), rec.ends))
            if rec.ends and framer._done:
                framer.reset(head_request=False)
        events.append(("eof", framer.feed_eof(), rec.ends))
    except ProtocolError as exc:
        events.append(("error", exc.status))
    heads = [(h.status, h.reason, h.headers, h.content_length, h.chunked, h.keep_alive, h.no_body) for h in rec.heads]
    return [heads, *events]


ANSWERS = [
    ANSWER % b"a1",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Request-ID: z\r\n\r\n",
    b"HTTP/1.1 201 Created\r\nContent-Length: 12\r\nConnection: close\r\nX-Request-ID: q-9\r\n\r\nhello world!",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\nX-Request-ID: bad id\r\n\r\nnop",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(ANSWERS), min_size=1, max_size=3),
    st.lists(st.integers(1, 400), max_size=4),
    st.booleans(),
    st.binary(max_size=8),
)
def test_remembered_answers_arrive_as_parsed_ones_whatever_the_reads(
    answers: list[bytes], cuts: list[int], per_answer: bool, tail: bytes
) -> None:
    stream = b"".join(answers) + tail
    points = {c % (len(stream) + 1) for c in cuts} | {0, len(stream)}
    if per_answer:  # also a read boundary where each answer ends (the common case)
        points |= set(itertools.accumulate(len(a) for a in answers))
    points = sorted(points)
    reads = [stream[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]
    cold = _answer_events(reads, warm=[])
    warm = _answer_events(reads, warm=[a.replace(b"a1", b"other") for a in ANSWERS])
    assert warm == cold


def test_a_remembered_request_after_blank_lines_leaves_no_head_bytes_counted() -> None:
    # Blank lines between requests count against the head limit until a request ends; a
    # remembered request ends one too, so the next head starts from zero (as after a parse).
    roles = {**REQUEST_ROLES}
    request = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"
    RequestFramer(Recorder(), roles=roles, max_header_bytes=1024).feed(request)  # remembered
    split = b"GET /b HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"p" * 100 + b"\r\n\r\n"
    framer = RequestFramer(Recorder(), roles=roles, max_header_bytes=1024)
    framer.feed(b"\r\n" * 450)
    framer.feed(request)
    framer.release()
    framer.feed(split[:-4])  # a head still coming: 133 bytes counted, not 1,033
    framer.feed(split[-4:])
    assert [h.path for h in framer.handler.heads] == [b"/a", b"/b"]


# -- issue 10: framing holes -------------------------------------------------------------------------


def test_a_refused_pipelined_request_waits_behind_the_one_being_answered() -> None:
    rec = Recorder()
    framer = RequestFramer(rec)
    # The second request's head and body start are good; its chunk-size line is not.
    framer.feed(
        b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"
        b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n"
    )
    assert [h.path for h in rec.heads] == [b"/a"] and rec.ends == 1 and bytes(rec.bodies[0]) == b"hi"
    assert framer.backlog_bytes == 0  # nothing of the refused request is ever delivered
    framer.feed(b"more bytes after it are not read")
    with pytest.raises(ProtocolError) as err:
        framer.release()
    assert err.value.status == 400 and [h.path for h in rec.heads] == [b"/a"]
    # A refusal within the request still being received is raised at once.
    with pytest.raises(ProtocolError):
        RequestFramer(Recorder()).feed(b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")


@pytest.mark.parametrize(
    ("target", "canonical"),
    [
        (b"/auth/logi%6e", b"/auth/login"),
        (b"/%61pi/protected", b"/api/protected"),
        (b"/a%2D%2e%5f%7E%30", b"/a-._~0"),
        (b"/a%20b%c3%a9", b"/a%20b%C3%A9"),
        (b"/.well-known/x/..y/.z.", b"/.well-known/x/..y/.z."),
        (b"/100%25", b"/100%25"),  # an escaped '%' stays escaped: never decoded twice
    ],
)
def test_canonical_path_decodes_unreserved_escapes_only(target: bytes, canonical: bytes) -> None:
    assert canonical_path(target) == canonical


@pytest.mark.parametrize(
    "target",
    [
        b"/a%2fb",
        b"/a%2Fb",
        b"/a%5cb",
        b"/a%00",
        b"/a\\b",
        b"/api/%2e%2e/x",
        b"/api/%2E./x",
        b"/a/./b",
        b"/a/..",
        b"/a/.",
        b"/a%",
        b"/a%4",
        b"/a%g0",
        b"/a%+1",
    ],
)
def test_canonical_path_refuses(target: bytes) -> None:
    with pytest.raises(ProtocolError) as err:
        canonical_path(target)
    assert err.value.status == 400


def test_the_canonical_path_is_the_target_sent_on_and_the_query_is_kept() -> None:
    rec = replay(b"GET /%61pi/x?next=%2e%2e%2f HTTP/1.1\r\nHost: a\r\n\r\n")
    assert rec.heads[0].path == b"/api/x" and rec.heads[0].target == b"/api/x?next=%2e%2e%2f"


def test_an_upstream_connection_header_never_drops_its_framing_headers() -> None:
    rec = ResponseRecorder()
    ResponseFramer(rec).feed(b"HTTP/1.1 200 OK\r\nConnection: Content-Length, X-Hop\r\nContent-Length: 2\r\nX-Hop: 1\r\n\r\nok")
    assert rec.heads[0].headers == [(b"Content-Length", b"2")] and bytes(rec.body) == b"ok"


def test_chunk_bodies_split_anywhere_arrive_whole() -> None:
    data = b'POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5 ; a = "b;c"\r\nhello\r\n0\r\nX-T: 1\r\n\r\n'
    for cut in range(1, len(data)):
        rec = replay(data, [data[:cut], data[cut:]])
        assert bytes(rec.bodies[0]) == b"hello" and rec.ends == 1, cut


def test_a_chunk_size_line_longer_than_the_limit_is_refused() -> None:
    from appliance.balancer import framing

    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;" + b"a" * framing.MAX_CHUNK_LINE
    with pytest.raises(ProtocolError) as err:
        replay(head, [head[:100], head[100:]])
    assert err.value.status == 400


def test_an_endless_stream_of_empty_lines_is_a_head_too_large() -> None:
    # Empty lines before a request are allowed (RFC 9112 2.2) but count against the head limit.
    framer = RequestFramer(Recorder(), max_header_bytes=4096)
    with pytest.raises(ProtocolError) as err:
        for _ in range(10):
            framer.feed(b"\r\n" * 1024)
    assert err.value.status == 431
    rec = replay(b"\r\n\r\n\nGET /a HTTP/1.1\r\nHost: a\r\n\r\n", max_header_bytes=4096)  # a few are fine
    assert [h.path for h in rec.heads] == [b"/a"]
