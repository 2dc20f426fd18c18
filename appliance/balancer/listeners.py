"""Closing the balancer's listening sockets without resetting a client that already connected.

The kernel completes a TCP handshake before the server accepts the connection:
a client in the listen backlog has seen its connect succeed, and closing the
listening socket resets it. A stop therefore goes in three steps:

1. refuse_new_connections: a socket filter that drops every packet sent to the
   listener, so no new handshake completes (a client's SYN goes unanswered; it
   is refused once the socket is closed). Connections already in the backlog
   are sockets of their own and keep receiving.
2. take_backlog: accept everything waiting.
3. close the servers; what was taken is served like any other connection.

The filter belongs to the socket, not the process: the supervisor sets it when
the whole appliance stops (never when a new balancer takes over the socket), a
balancer that bound its own socket sets it itself. Without it (not Linux, or it
cannot be set) the close follows the backlog at once, and only a connection
made in between is lost.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import socket
import sys
from typing import Any

log = logging.getLogger(__name__)

SO_ATTACH_FILTER = 26  # Linux, every architecture (Python's socket module does not name it)
BPF_RET_K = 0x06  # classic BPF "return constant": keep that many bytes of the packet, 0 drops it


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def refuse_new_connections(sock: socket.socket) -> bool:
    """Drop every packet to this listening socket from now on; False where that cannot be done."""
    if not sys.platform.startswith("linux"):
        return False
    program = (_SockFilter * 1)(_SockFilter(BPF_RET_K, 0, 0, 0))
    fprog = _SockFprog(1, program)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(memoryview(fprog).cast("B")))
    except OSError as exc:
        log.debug("listening socket filter not set (%s): the backlog is taken just before the close", exc)
        return False
    return True


def take_backlog(sock: socket.socket) -> list[socket.socket]:
    """Every connection waiting in a (non-blocking) listening socket's backlog, accepted now."""
    taken: list[socket.socket] = []
    while True:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            return taken
        except OSError as exc:  # out of descriptors, or a connection reset while queued: stop here
            log.warning("balancer stop: backlog not fully accepted: %s", exc)
            return taken
        conn.setblocking(False)
        taken.append(conn)


def close_listeners(
    servers: list[Any], listeners: list[tuple[socket.socket, Any, Any]], handshake_timeout: float | None, *, refuse: bool
) -> list[asyncio.Task]:
    """Stop listening; serve (with its protocol factory and ssl) every connection already made.

    Returns the tasks that hand the connections taken from the backlog to the loop: await
    them before deciding that nothing is left to serve.

    `refuse`: set the filter first. Only for sockets this process alone listens on: the
    filter belongs to the socket, so a balancer started by the supervisor (which may hand
    the same socket to the balancer replacing this one) leaves that step to the supervisor.
    """
    loop = asyncio.get_running_loop()
    if refuse:
        for sock, _, _ in listeners:
            refuse_new_connections(sock)
    taken = [(take_backlog(sock), factory, ssl) for sock, factory, ssl in listeners]
    for server in servers:
        server.close()
    for sock, _, _ in listeners:
        if sock.fileno() != -1:  # uvloop closed the descriptor itself: forget it rather than close a reused number
            sock.detach()
    tasks = []
    for conns, factory, ssl in taken:
        for conn in conns:
            timeout = handshake_timeout if ssl is not None else None
            task = loop.create_task(loop.connect_accepted_socket(factory, conn, ssl=ssl, ssl_handshake_timeout=timeout))
            task.add_done_callback(_log_failed_adoption)
            tasks.append(task)
    return tasks


def _log_failed_adoption(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("balancer stop: a connection from the backlog could not be served: %s", task.exception())
