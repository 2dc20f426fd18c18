"""HTTP/1.1 message framing for the proxy: bytes in, a few calls out, no sockets.

(Over 500 lines on purpose: request and answer framing share the role tables, the head
cache and the llhttp cross-checks; apart, each would reach into the other.)

httptools (llhttp) tokenises; this module adds what a proxy must enforce on top
and decides what may travel to the other side:

  * smuggling rules: Content-Length together with Transfer-Encoding, repeated or
    malformed Content-Length, any transfer coding but one final "chunked",
    chunked bodies in HTTP/1.0, missing or repeated Host, HTTP versions other
    than 1.0/1.1, CONNECT, targets that are not origin-form. llhttp already
    refuses obs-fold, whitespace before the colon, bad header names and value
    characters, bare CR/LF and bad chunk sizes; its errors become ours.
  * Host must be one valid authority (reg-name, IPv4 or [IPv6], optional port);
    Connection may not name Content-Length, Transfer-Encoding or Host (dropping
    them as hop-by-hop would turn the body into a second request).
  * the request target's path is made canonical once (canonical_path): escapes of
    unreserved characters are decoded; encoded '/', '\\' or NUL, raw backslashes,
    dot segments and malformed escapes are refused.
  * limits: the request head (431) and body (413) sizes.
  * header roles: each lower-cased name has a role (forward, drop, capture), so
    hop-by-hop headers (Connection and what it names, Keep-Alive, TE, Trailer,
    Upgrade, Proxy-*) never pass, and headers the proxy replaces (X-Forwarded-*,
    X-Request-ID, identity headers) are captured instead of forwarded; names with
    '_' are dropped (a WSGI server would read them as their '-' spelling). The proxy
    extends the role table once at start; nothing is decided twice per header.

Every refusal is a ProtocolError carrying the 4xx to answer with (h11's
error_status_hint); an exception of any other type is a bug of ours.

RequestFramer calls its handler three times per request: on_request(head),
on_body(bytes) per body piece (chunked bodies arrive de-chunked) and
on_request_end(). A pipelined request that arrives while the previous one is
still being answered is held in a backlog and replayed by release(). A
pipelined request that is refused does not cost the ones before it their
answers: its ProtocolError waits in the backlog and release() raises it once
they were answered (what nginx does). ResponseFramer does the same for upstream
answers (on_response, on_response_body, on_response_end, or on_whole_response for
a whole remembered answer in one read), skipping 1xx interim answers and bodies of
HEAD/204/304. Writing the other way, without I/O too, is writer.py's job.

RequestFramer knows where each message starts and ends and feeds llhttp one piece
at a time: the head (up to its blank line), then the Content-Length body, or the
chunked body line by line. Chunk-size lines are checked here (RFC 9112 7.1, with
BWS in extensions, which llhttp refuses) and reach llhttp as plain "<hex>CRLF";
chunk data, the CRLF after it and trailers are still checked by llhttp. After
each piece the framer checks that llhttp agrees (a head ended, a body ended), so
a disagreement is a 400, never a second reading of the same bytes. Because it
knows the ends: bytes after a request that ends the connection are discarded;
the Content-Length body of an Upgrade request (llhttp stops at its head) is
delivered as its body, and a chunked one is refused.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Protocol

import httptools

# Header roles (values of the role tables).
FORWARD = 0  # not in a table: forwarded as is
DROP = 1  # hop-by-hop or replaced: never forwarded
CAPTURE = 2  # recorded in head.captured (first value wins) and not forwarded
_CL = 3
_TE = 4
_CONNECTION = 5
_HOST = 6
_EXPECT = 7

HOP_BY_HOP = (b"keep-alive", b"te", b"trailer", b"upgrade", b"proxy-connection", b"proxy-authorization", b"proxy-authenticate")

REQUEST_ROLES: dict[bytes, int] = {
    b"content-length": _CL,
    b"transfer-encoding": _TE,
    b"connection": _CONNECTION,
    b"host": _HOST,
    b"expect": _EXPECT,
    **{name: DROP for name in HOP_BY_HOP},
}
RESPONSE_ROLES: dict[bytes, int] = {
    b"content-length": _CL,
    b"transfer-encoding": _TE,
    b"connection": _CONNECTION,
    **{name: DROP for name in HOP_BY_HOP},
}
DROP_PREFIXES: tuple[bytes, ...] = (b"proxy-",)
_ALLOWED_VERSIONS = ("1.1", "1.0")
NAME_CACHE_SIZE = 4096
# Heads parsed from whole messages, by their exact bytes (see RequestFramer.feed): bounded in count and size.
HEAD_CACHE_SIZE = 512
HEAD_CACHE_MAX_BYTES = 4096
_TOKEN_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"
# Connection may not name these: dropped as hop-by-hop, they would change where the message ends.
_FRAMING_HEADERS = frozenset((b"content-length", b"transfer-encoding", b"host"))
# Host (RFC 9112 3.2, RFC 3986 3.2.2): reg-name of unreserved characters, IPv4, or [IPv6]; an optional port.
# Stricter than RFC 3986 on purpose: no sub-delims (',' ';' ...), no escapes, no userinfo.
_HOST_VALUE = re.compile(rb"(?:[A-Za-z0-9._~-]{1,255}|\[([0-9A-Fa-f:.]{2,45})\])(?::[0-9]{1,5})?")
# chunk = chunk-size [ chunk-ext ] CRLF; chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] )
_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_CHUNK_LINE = re.compile(
    rb"0*([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*%s+(?:[ \t]*=[ \t]*(?:%s+|\"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*\"))?)*\r\n"
    % (_TCHAR, _TCHAR)
)
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions
# Where the framer is in the byte stream (RequestFramer._mode).
_AT_HEAD, _IN_LENGTH_BODY, _AT_CHUNK_SIZE, _IN_CHUNK, _IN_TRAILER = range(5)
_HEX = b"0123456789abcdefABCDEF"
_CR_LF = (b"\r", b"\n")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_REFUSED_ESCAPES = frozenset((0x2F, 0x5C, 0x00))  # '/', '\\', NUL: a worker decoding them would see another path
_NAME_CACHES: dict[tuple[Any, ...], tuple[dict[bytes, int], dict[bytes, Any]]] = {}


def _name_cache(roles: dict[bytes, int], *extra: Any) -> dict[bytes, Any]:
    """A cache shared by every framer with the same role table (and `extra` settings).

    Keyed by the table's id; the entry keeps the table alive, so that id cannot be reused.
    """
    key = (id(roles), *extra)
    entry = _NAME_CACHES.get(key)
    if entry is None or entry[0] is not roles:
        entry = _NAME_CACHES[key] = (roles, {})
    return entry[1]


def _remember(cache: dict[bytes, Any], key: bytes, value: Any) -> None:
    if len(cache) >= HEAD_CACHE_SIZE:
        cache.clear()  # many distinct heads (say, one per token): start over rather than track ages
    cache[key] = value


class ProtocolError(Exception):
    """The peer broke HTTP/1.1 or a limit; `status` is the 4xx to answer with."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_request"):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


def _too_large_head() -> ProtocolError:
    return ProtocolError("request header fields too large", 431, "headers_too_large")


class RequestHead:
    """One parsed request head. headers: forwarded (lower-cased name, value) pairs."""

    __slots__ = (
        "method",
        "target",
        "path",
        "version",
        "headers",
        "captured",
        "host",
        "content_length",
        "chunked",
        "keep_alive",
        "expect",
        "memo",
    )

    def __init__(self) -> None:
        self.memo: Any = None  # what the proxy derives from this head once (a head may be delivered many times)
        self.method = b""
        self.target = b""
        self.path = b""
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.captured: dict[bytes, bytes] = {}
        self.host = b""
        self.content_length = -1  # -1: no Content-Length
        self.chunked = False
        self.keep_alive = True
        self.expect = b""

    @property
    def has_body(self) -> bool:
        return self.chunked or self.content_length > 0


class RequestHandler(Protocol):
    def on_request(self, head: RequestHead) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_request_end(self) -> None: ...


class RequestFramer:
    """Feed client bytes; get whole request heads, body pieces and ends, or a ProtocolError.

    Clients send the same heads again and again (the same client, path and token).
    A read that is exactly one whole body-less keep-alive request, at a message
    boundary, is looked up by its bytes among the heads parsed before with the same
    roles and limits; found, llhttp is skipped and the same RequestHead (never
    changed once delivered) is delivered again. Only heads that llhttp parsed and
    every rule here accepted are remembered, so a cached answer is the one a fresh
    parse would give.
    """

    def __init__(
        self,
        handler: RequestHandler,
        *,
        max_header_bytes: int = 65536,
        max_body_bytes: int = 1 << 62,
        roles: dict[bytes, int] | None = None,
        drop_prefixes: tuple[bytes, ...] = DROP_PREFIXES,
    ):
        self.handler = handler
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.roles = roles if roles is not None else REQUEST_ROLES
        self.drop_prefixes = drop_prefixes
        # Header names as spelled -> (lower-case name, role): shared by every framer with the same
        # roles, so the lower() and the table lookups happen once per spelling, not once per header.
        self._names: dict[bytes, tuple[bytes, int, int]] = _name_cache(self.roles, drop_prefixes)
        self._heads: dict[bytes, RequestHead] = _name_cache(self.roles, drop_prefixes, "heads", max_header_bytes, max_body_bytes)
        self._began = 0  # messages begun during the current feed()
        self._last = False  # a request that ends the connection was read: llhttp refuses anything after it
        self._parser = httptools.HttpRequestParser(self)
        self._head: RequestHead | None = None
        self._url = b""
        self._fields_size = 0  # name + value + 4 of every field of the current head
        self._head_size = 0  # bytes of the head seen so far (431 beyond the limit)
        self._in_head = False  # between the first byte and the end of the head
        self._in_body = False
        self._body_size = 0
        self._connection = b""
        self._te_count = 0
        self._mode = _AT_HEAD  # where the next byte belongs (see _consume)
        self._left = 0  # bytes still due of a Content-Length body, or of a chunk with its CRLF
        self._line = b""  # a chunk-size or trailer line not yet whole
        self._tail = b""  # the last bytes of an unfinished head (its blank line may span two reads)
        self._trailer_size = 0
        self._completed: RequestHead | None = None  # the head llhttp finished during the last piece fed
        self._upgrade_body = False  # llhttp skips the body of an Upgrade request: the framer delivers it
        self._raw = False  # the current Content-Length body is delivered here, not by llhttp
        self.busy = False  # a request is being answered: hold later ones
        self._backlog: list[tuple[int, Any]] = []
        self.backlog_bytes = 0
        self.dead = False
        self._deferred = False  # a refused pipelined request waits in the backlog behind good ones

    # -- input ------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Parse `data`; raise ProtocolError on bad framing (the framer is then dead).

        A ProtocolError of a request pipelined behind one being answered is not raised
        here: release() raises it once the requests before it were answered.
        """
        if self.dead:
            if self._deferred:
                return  # after a refused pipelined request nothing more is read
            raise ProtocolError("connection is in an error state")
        at_boundary = self._mode == _AT_HEAD and not self._in_head and not self.busy and not self._last
        if at_boundary:
            head = self._heads.get(data)
            if head is not None:
                self._head_size = 0  # as at the end of a parsed request (blank lines may have counted)
                self.handler.on_request(head)
                self.busy = True
                self.handler.on_request_end()
                return
        self._began = 0
        try:
            self._consume(data)
        except ProtocolError as exc:
            self.dead = True
            if self.busy:  # the refused message comes after one still being answered: that one keeps its answer
                self._defer(exc)
                return
            raise
        except BaseException:
            self.dead = True
            raise
        if at_boundary and self._began == 1 and not self._in_head and not self._in_body and len(data) <= HEAD_CACHE_MAX_BYTES:
            head = self._head
            if head is not None and head.keep_alive and not head.has_body and not head.expect:
                _remember(self._heads, data, head)  # exactly this one whole request: the same bytes parse the same

    def _consume(self, data: bytes) -> None:
        """Feed llhttp piece by piece: a head, a Content-Length body, chunk-size lines, chunks, trailers."""
        while data:
            mode = self._mode
            if mode == _AT_HEAD:
                if self._last:
                    return  # after a request that ends the connection nothing is read (nginx discards it too)
                data = self._consume_head(data)
            elif mode == _IN_LENGTH_BODY or mode == _IN_CHUNK:
                left = self._left
                piece, data = (data, b"") if len(data) <= left else (data[:left], data[left:])
                self._left = left = left - len(piece)
                if mode == _IN_CHUNK:
                    self._llhttp(piece)  # chunk data, then its CRLF (checked by llhttp)
                    if not left:
                        self._mode = _AT_CHUNK_SIZE
                elif self._raw:  # the body of an Upgrade request, which llhttp does not read
                    self.on_body(piece)
                    if not left:
                        self.on_message_complete()
                        self._end_of_message()
                else:
                    self._llhttp(piece)
                    if not left:
                        self._end_of_message()
            else:  # a chunk-size line or a trailer line
                i = data.find(b"\n")
                if i < 0:
                    self._line += data
                    if len(self._line) > (MAX_CHUNK_LINE if mode == _AT_CHUNK_SIZE else self.max_header_bytes):
                        raise ProtocolError("chunk-size line too long") if mode == _AT_CHUNK_SIZE else _too_large_head()
                    return
                line = self._line + data[: i + 1] if self._line else data[: i + 1]
                data = data[i + 1 :]
                self._line = b""
                if mode == _AT_CHUNK_SIZE:
                    self._chunk_size(line)
                else:
                    self._trailer_line(line)

    def _consume_head(self, data: bytes) -> bytes:
        """Feed llhttp what `data` holds of a head (up to its blank line); return the bytes after it."""
        if not self._in_head and data[:1] in _CR_LF:  # empty lines before a request: skipped by llhttp, all at once
            blank = len(data) - len(data.lstrip(b"\r\n"))
            self._head_size += blank  # and counted: an endless stream of them is a head too large
            if self._head_size > self.max_header_bytes:
                raise _too_large_head()
            self._tail = b""
            self._llhttp(data[:blank])
            return data[blank:]
        tail = self._tail
        probe = tail + data if tail else data
        i = probe.find(b"\r\n\r\n")
        if i < 0:  # the head goes on in a later read
            # Bytes of a head still being read count against the head limit even
            # before httptools hands them over (it buffers partial header lines).
            self._tail = probe[-3:]
            self._head_size += len(data)
            if self._head_size > self.max_header_bytes:
                raise _too_large_head()
            self._llhttp(data)
            return b""
        end = i + 4 - len(tail)
        self._tail = b""
        self._head_size += end
        self._completed = None
        upgraded = self._llhttp(data[:end])
        head = self._completed
        if head is None:
            if self._in_head:  # llhttp read a blank line and no end of head: it and we disagree
                raise ProtocolError("malformed request head")
            return data[end:]  # blank lines before a request
        if head.chunked:
            if upgraded:
                raise ProtocolError("an Upgrade request with a chunked body is not supported")
            self._mode = _AT_CHUNK_SIZE
        elif head.content_length > 0:
            size = head.content_length
            if not upgraded and len(data) - end >= size:  # the common case: the whole body came with its head
                self._llhttp(data[end : end + size])
                if self._in_body:
                    raise ProtocolError("malformed request body")
                return data[end + size :]
            self._mode = _IN_LENGTH_BODY
            self._left = size
            self._raw = upgraded
        elif self._in_body:
            raise ProtocolError("malformed request head")  # llhttp did not end a message without a body
        return data[end:]

    def _chunk_size(self, line: bytes) -> None:
        m = _CHUNK_LINE.fullmatch(line)
        if m is None:
            raise ProtocolError("malformed chunk-size line")
        digits = m.group(1)
        self._llhttp(digits + b"\r\n")  # extensions mean nothing to us and never travel on (bodies are re-chunked)
        size = int(digits, 16)
        if size:
            self._mode = _IN_CHUNK
            self._left = size + 2
        else:
            self._mode = _IN_TRAILER
            self._trailer_size = 0

    def _trailer_line(self, line: bytes) -> None:
        self._trailer_size += len(line)
        if self._trailer_size > self.max_header_bytes:
            raise _too_large_head()
        self._llhttp(line)
        if line == b"\r\n":
            self._end_of_message()

    def _end_of_message(self) -> None:
        """The framer counted the message's last byte: llhttp must have ended it too."""
        self._mode = _AT_HEAD
        self._raw = False
        if self._in_body:
            raise ProtocolError("malformed request body")

    def _llhttp(self, data: bytes) -> bool:
        """Feed one piece to llhttp; True when it was an Upgrade head (a fresh parser reads on)."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            inner = exc.__context__
            if isinstance(inner, ProtocolError):
                raise inner from None
            raise (inner or exc) from None  # a bug of ours, not the peer's: let the server log it
        except httptools.HttpParserUpgrade as exc:
            offset = int(exc.args[0]) if exc.args else len(data)
        except httptools.HttpParserError as exc:
            raise ProtocolError(str(exc) or "malformed request") from None
        else:
            return False
        # An Upgrade request was parsed as a plain one (Upgrade is hop-by-hop and dropped);
        # a fresh parser reads what follows. CONNECT was refused earlier. Raised out here: in
        # the except block an error would get the upgrade as its __context__.
        self._parser = httptools.HttpRequestParser(self)
        if offset != len(data):
            raise ProtocolError("malformed request")  # heads are fed alone: llhttp cannot stop before the end
        return True

    def _defer(self, exc: ProtocolError) -> None:
        """Hold `exc` behind the whole requests in the backlog; what the refused message delivered is dropped."""
        backlog = self._backlog
        while backlog and backlog[-1][0] != 2:
            kind, arg = backlog.pop()
            if kind == 1:
                self.backlog_bytes -= len(arg)
        backlog.append((3, exc))
        self._deferred = True

    def release(self) -> None:
        """The current request was answered: deliver held (pipelined) events up to the next request end.

        Raises the ProtocolError of a refused pipelined request when it is next.
        """
        self.busy = False
        backlog = self._backlog
        while backlog and not self.busy:
            kind, arg = backlog.pop(0)
            if kind == 0:
                self.handler.on_request(arg)
            elif kind == 1:
                self.backlog_bytes -= len(arg)
                self.handler.on_body(arg)
            elif kind == 2:
                self.busy = True
                self.handler.on_request_end()
            else:  # a refused pipelined request, now that the ones before it were answered
                raise arg

    @property
    def idle(self) -> bool:
        """No partial request is buffered (safe to close on a keep-alive timeout)."""
        return not self._in_head and not self._in_body and not self._backlog

    # -- httptools callbacks ----------------------------------------------------------
    def on_message_begin(self) -> None:
        self._began += 1
        self._head = RequestHead()
        self._url = b""
        self._fields_size = 0
        self._in_head = True
        self._in_body = False
        self._body_size = 0
        self._connection = b""
        self._te_count = 0
        self._upgrade_body = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        head = self._head
        if self._in_body or head is None:
            return  # chunked trailer fields are not forwarded
        known = self._names.get(name)
        if known is None:
            known = self._learn(name)
        lname, role, size = known
        self._fields_size += size + len(value)
        if role == FORWARD:
            head.headers.append((lname, value))
        elif role == CAPTURE:
            if lname not in head.captured:
                head.captured[lname] = value
        elif role != DROP:
            self._special(head, role, lname, value)

    def _learn(self, name: bytes) -> tuple[bytes, int, int]:
        """(lower-case name, role, bytes of ": \r\n" and name) of a name as spelled; remembered for the next request."""
        lname = name.lower()
        # A name with '_' is dropped (nginx's default): CGI/WSGI servers read "X_User" as "X-User",
        # so it could stand in for a header this proxy replaces.
        role = DROP if lname.startswith(self.drop_prefixes) or b"_" in lname else self.roles.get(lname, FORWARD)
        known = (lname, role, len(name) + 4)
        if len(self._names) < NAME_CACHE_SIZE:  # clients choose names: bounded
            self._names[name] = known
        return known

    def _special(self, head: RequestHead, role: int, lname: bytes, value: bytes) -> None:
        if role == _CL:
            value = value.strip()
            if head.content_length != -1:
                raise ProtocolError("repeated Content-Length")
            if not value.isdigit() or len(value) > 18:
                raise ProtocolError("malformed Content-Length")
            head.content_length = int(value)
            head.headers.append((lname, value))
        elif role == _TE:
            self._te_count += 1
            if self._te_count > 1 or value.strip().lower() != b"chunked":
                raise ProtocolError("only a single 'chunked' transfer coding is accepted")
            head.chunked = True
        elif role == _CONNECTION:
            self._connection = value if not self._connection else self._connection + b"," + value
        elif role == _HOST:
            if head.host:
                raise ProtocolError("repeated Host")
            value = value.rstrip(b" \t")
            m = _HOST_VALUE.fullmatch(value)
            if m is None or (m.group(1) is not None and not _ipv6(m.group(1))):
                raise ProtocolError("invalid Host")
            head.host = value
            head.headers.append((lname, value))
        elif role == _EXPECT:
            head.expect = value.strip().lower()
            if head.expect != b"100-continue":
                raise ProtocolError("unsupported Expect", 417, "expectation_failed")

    def on_headers_complete(self) -> None:
        head = self._head
        assert head is not None
        parser = self._parser
        self._in_head = False
        self._in_body = True
        head.method = parser.get_method()
        head.version = parser.get_http_version()
        head.keep_alive = parser.should_keep_alive()
        if not head.keep_alive:
            self._last = True
        self._check(head)
        if self._connection:
            if not _connection_named(self._connection).isdisjoint(_FRAMING_HEADERS):
                raise ProtocolError("Connection may not name Content-Length, Transfer-Encoding or Host")
            _drop_connection_named(head.headers, self._connection)
        self._upgrade_body = head.has_body and parser.should_upgrade()
        self._completed = head
        if self.busy:
            self._backlog.append((0, head))
        else:
            self.handler.on_request(head)

    def _check(self, head: RequestHead) -> None:
        if head.version not in _ALLOWED_VERSIONS:
            raise ProtocolError("unsupported HTTP version")
        # Counted per field as it came (the byte count of feed() cannot see where a pipelined head starts).
        if len(self._url) + self._fields_size + 16 > self.max_header_bytes:
            raise _too_large_head()
        if head.method == b"CONNECT":
            raise ProtocolError("CONNECT is not supported", 405, "method_not_allowed")
        if head.version == "1.1" and not head.host:
            raise ProtocolError("Host header is required")
        if head.chunked and head.content_length != -1:
            raise ProtocolError("Content-Length with Transfer-Encoding")
        if head.chunked and head.version != "1.1":
            raise ProtocolError("Transfer-Encoding in an HTTP/1.0 request")
        if head.content_length > self.max_body_bytes:
            raise ProtocolError("request body too large", 413, "payload_too_large")
        url = self._url
        if url[:1] != b"/":
            if url == b"*" and head.method == b"OPTIONS":
                pass
            elif url[:7].lower() == b"http://" or url[:8].lower() == b"https://":
                # absolute-form: keep the path (and query) for the upstream
                rest = url.split(b"//", 1)[1]
                slash = rest.find(b"/")
                url = rest[slash:] if slash >= 0 else b"/"
            else:
                raise ProtocolError("request target must be a path")
        q = url.find(b"?")
        path = url if q < 0 else url[:q]
        if b"%" in path or b"/." in path or b"\\" in path:  # the one cheap check of the common case
            path = canonical_path(path)
            url = path if q < 0 else path + url[q:]
        head.target = url
        head.path = path

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.max_body_bytes:
            raise ProtocolError("request body too large", 413, "payload_too_large")
        if self.busy:
            self._backlog.append((1, body))
            self.backlog_bytes += len(body)
        else:
            self.handler.on_body(body)

    def on_message_complete(self) -> None:
        if self._upgrade_body:  # llhttp ends an Upgrade request at its head; its body is still to come
            self._upgrade_body = False
            return
        self._in_body = False
        self._head_size = 0
        if self.busy:
            self._backlog.append((2, None))
        else:
            self.busy = True
            self.handler.on_request_end()


def _connection_named(connection: bytes) -> set[bytes]:
    return {t.strip().lower() for t in connection.split(b",")} - {b"close", b"keep-alive", b""}


def _drop_connection_named(headers: list[tuple[bytes, bytes]], connection: bytes) -> None:
    """Remove the headers that the Connection header names (they are hop-by-hop); framing headers stay."""
    named = _connection_named(connection) - _FRAMING_HEADERS
    if named:
        headers[:] = [(n, v) for n, v in headers if n.lower() not in named]


def _ipv6(text: bytes) -> bool:
    try:
        ipaddress.IPv6Address(text.decode("ascii"))
    except ValueError:
        return False
    return True


def canonical_path(path: bytes) -> bytes:
    """The one path the balancer and the workers agree on, or ProtocolError (400).

    Escapes of unreserved characters (ALPHA DIGIT - . _ ~) are decoded, other escapes
    kept (hex in upper case); encoded '/', '\\' and NUL, raw backslashes, malformed
    escapes and dot segments ("." or "..", encoded or not) are refused.
    """
    if b"\\" in path:
        raise ProtocolError("backslash in the request path")
    if b"%" in path:
        parts = path.split(b"%")
        out = [parts[0]]
        for part in parts[1:]:
            hx = part[:2]
            if len(hx) != 2 or hx.translate(None, _HEX):
                raise ProtocolError("malformed percent-escape in the request path")
            c = int(hx, 16)
            if c in _UNRESERVED:
                out.append(bytes((c,)))
            elif c in _REFUSED_ESCAPES:
                raise ProtocolError("encoded '/', '\\' or NUL in the request path")
            else:
                out.append(b"%" + hx.upper())
            out.append(part[2:])
        path = b"".join(out)
    if b"/." in path:
        for segment in path.split(b"/"):
            if segment == b"." or segment == b"..":
                raise ProtocolError("dot segment in the request path")
    return path


class ResponseHead:
    """One upstream answer head: the end-to-end headers as spelled (Content-Length kept).

    They are kept ready to send: `raw` is the flat list name, b": ", value, b"\r\n", ... so the
    proxy joins it as is; `headers` gives (and takes) them as (name, value) pairs.
    """

    __slots__ = ("status", "reason", "raw", "content_length", "chunked", "keep_alive", "no_body", "memo")

    def __init__(self) -> None:
        self.memo: Any = None  # what the proxy derives from this head once (a head may be delivered many times)
        self.status = 0
        self.reason = b""
        self.raw: list[bytes] = []
        self.content_length = -1
        self.chunked = False
        self.keep_alive = True
        self.no_body = False

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        raw = self.raw
        return [(raw[i], raw[i + 2]) for i in range(0, len(raw), 4)]

    @headers.setter
    def headers(self, pairs: list[tuple[bytes, bytes]]) -> None:
        raw: list[bytes] = []
        for name, value in pairs:
            raw += (name, b": ", value, b"\r\n")
        self.raw = raw


class ResponseHandler(Protocol):
    def on_response(self, head: ResponseHead) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    def on_response_end(self) -> None: ...

    # The three above at once, for a whole Content-Length answer read in one piece (a remembered head).
    def on_whole_response(self, head: ResponseHead, body: bytes) -> None: ...


class ResponseFramer:
    """Feed upstream bytes; get the answer head, body pieces and end, or a ProtocolError.

    Like RequestFramer, answer heads are remembered by their bytes: a read that is
    one whole answer whose head was parsed before (same roles and limit) and whose
    body is exactly its Content-Length skips llhttp and gets the same ResponseHead.
    """

    def __init__(
        self,
        handler: ResponseHandler,
        *,
        max_header_bytes: int = 65536,
        roles: dict[bytes, int] | None = None,
        volatile: bytes = b"",
    ):
        self.handler = handler
        self.max_header_bytes = max_header_bytes
        self.roles = roles if roles is not None else RESPONSE_ROLES
        if volatile and self.roles.get(volatile) != DROP:
            raise ValueError(f"{volatile!r} can only be left out of the head cache's keys if its role is DROP")
        # A dropped header whose value changes with every answer (the upstream's request id) would
        # make every head new: its line, when its value is a plain token, is left out of the key.
        self._volatile = self._spelled = b"\r\n" + volatile + b":" if volatile else b""
        self._names: dict[bytes, int] = _name_cache(self.roles)  # name as spelled -> role
        self._heads: dict[bytes, ResponseHead] = _name_cache(self.roles, "answers", max_header_bytes, volatile)
        self._between = True  # llhttp holds no byte of an answer
        self._left = 0  # body bytes still due of an answer delivered from a remembered head
        self._last = False  # an answer that ends the connection was parsed
        self._began = 0  # answers begun during the current feed()
        self._parser = httptools.HttpResponseParser(self)
        self._head: ResponseHead | None = None
        self._connection = b""
        self._head_size = 0
        self._in_head = False
        self._done = False  # the answer was delivered whole (HEAD: at its head)
        self.head_request = False  # set by the caller before feeding the answer to a HEAD

    def reset(self, head_request: bool) -> None:
        """Prepare for the next answer on the same connection."""
        self.head_request = head_request
        self._done = False
        self._head = None
        self._left = 0

    def feed(self, data: bytes) -> None:
        if self._left:  # the body of an answer whose head was remembered: counted, not parsed
            data = self._body(data)
            if not data:
                return
        fresh = self._between and self._head is None and not self.head_request and not self._last
        if fresh and self._remembered(data):
            return
        self._parse(data, fresh)

    def _remembered(self, data: bytes) -> bool:
        """Deliver an answer whose head was seen before, with its body or the start of it; False if not one."""
        end = data.find(b"\r\n\r\n") + 4
        head = self._heads.get(self._key(data, end)) if end >= 4 else None
        if head is None:
            return False
        got = len(data) - end
        if got == head.content_length:
            self._head = head
            self._done = True
            self._head_size = 0
            self.handler.on_whole_response(head, data[end:])
            return True
        if got > head.content_length:
            return False  # more than the answer: llhttp reads it all
        self._head = head
        self._done = False
        self._head_size = 0
        self._left = head.content_length - got
        self.handler.on_response(head)
        if got:
            self.handler.on_response_body(data[end:])
        return True

    def _parse(self, data: bytes, fresh: bool) -> None:
        if self._in_head or self._head is None:
            self._head_size += len(data)
        self._began = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            inner = exc.__context__
            if isinstance(inner, ProtocolError):
                raise inner from None
            raise (inner or exc) from None
        except httptools.HttpParserError as exc:
            raise ProtocolError(f"upstream sent a malformed answer: {exc}", 502, "bad_gateway") from None
        if self._in_head and self._head_size > self.max_header_bytes:
            raise ProtocolError("upstream answer head too large", 502, "bad_gateway")
        if fresh and self._began == 1 and self._between:
            head = self._head
            if head is not None and head.keep_alive and not head.chunked and head.content_length >= 0 and not head.no_body:
                end = data.find(b"\r\n\r\n") + 4
                if 4 <= end <= HEAD_CACHE_MAX_BYTES and len(data) - end == head.content_length:
                    _remember(self._heads, self._key(data, end), head)  # exactly this one whole answer

    def _body(self, data: bytes) -> bytes:
        """Deliver the next piece of a remembered answer's body; return what follows its end."""
        left = self._left
        piece, rest = (data, b"") if len(data) <= left else (data[:left], data[left:])
        self._left = left - len(piece)
        self.handler.on_response_body(piece)
        if not self._left:
            self._done = True
            self.handler.on_response_end()
        return rest  # bytes after the answer: parsed as llhttp would parse them (it is between answers)

    def _key(self, data: bytes, end: int) -> bytes:
        """The head's bytes, less the volatile header's (last) line when it holds a plain token."""
        head = data[:end]
        marker = self._volatile
        if marker:
            # As the upstream spelled it last time (no lower() of the head), from the end (it sorts late).
            i = head.rfind(self._spelled)
            if i < 0:
                i = head.lower().rfind(marker)
                if i >= 0:
                    self._spelled = head[i : i + len(marker)]
            if i >= 0:
                j = head.find(b"\r\n", i + 2)
                value = head[i + len(marker) : j]
                if value[:1] == b" ":
                    value = value[1:]
                if 0 < len(value) <= 128 and not value.translate(None, _TOKEN_CHARS):  # only [A-Za-z0-9._-]
                    return head[:i] + head[j:]
        return head

    def feed_eof(self) -> bool:
        """The upstream closed: True when that ended a close-delimited body (the answer is whole)."""
        head = self._head
        if head is not None and not self._done and not self._in_head and head.content_length < 0 and not head.chunked:
            self._done = True
            self.handler.on_response_end()
            return True
        return False

    def on_message_begin(self) -> None:
        self._began += 1
        self._between = False
        self._head = ResponseHead()
        self._connection = b""
        self._in_head = True
        self._done = False

    def on_status(self, reason: bytes) -> None:
        if self._head is not None:
            self._head.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        head = self._head
        if head is None or not self._in_head:
            return
        role = self._names.get(name)
        if role is None:
            lname = name.lower()
            role = DROP if lname.startswith(DROP_PREFIXES) else self.roles.get(lname, FORWARD)
            if len(self._names) < NAME_CACHE_SIZE:
                self._names[name] = role
        if role == FORWARD:
            head.raw += (name, b": ", value, b"\r\n")  # answers keep the upstream's spelling
        elif role == _CL:
            value = value.strip()
            if head.content_length != -1 or not value.isdigit():
                raise ProtocolError("upstream sent a bad Content-Length", 502, "bad_gateway")
            head.content_length = int(value)
            head.raw += (name, b": ", value, b"\r\n")
        elif role == _TE:
            head.chunked = value.strip().lower().endswith(b"chunked")
        elif role == _CONNECTION:
            self._connection = value if not self._connection else self._connection + b"," + value

    def on_headers_complete(self) -> None:
        head = self._head
        assert head is not None
        self._in_head = False
        self._head_size = 0
        parser = self._parser
        head.status = parser.get_status_code()
        head.keep_alive = parser.should_keep_alive()
        if not head.keep_alive:
            self._last = True  # llhttp refuses any byte after this answer; no remembered head may skip that
        if 100 <= head.status < 200:
            if head.status == 101:
                raise ProtocolError("upstream switched protocols", 502, "bad_gateway")
            self._head = None  # interim answer (100 Continue, 103): not forwarded
            return
        if self._connection:
            pairs = head.headers
            _drop_connection_named(pairs, self._connection)
            head.headers = pairs
        head.no_body = self.head_request or head.status in (204, 304)
        if head.chunked:
            head.content_length = -1
            head.headers = [(n, v) for n, v in head.headers if n.lower() != b"content-length"]
        self.handler.on_response(head)
        if self.head_request:
            # httptools cannot be told "no body follows" (HEAD): the answer ends here,
            # and a fresh parser reads the next answer on this connection.
            self._done = True
            self._parser = httptools.HttpResponseParser(self)
            self._between = True
            self.handler.on_response_end()

    def on_body(self, body: bytes) -> None:
        if not self._done and self._head is not None:
            self.handler.on_response_body(body)

    def on_message_complete(self) -> None:
        self._between = True
        if self._head is None or self._done:
            return  # end of an interim answer, or of a HEAD answer already delivered
        self._done = True
        self.handler.on_response_end()
