"""The loopback address of an internal listener (api worker, monitor): bound, announced, read back.

By default ([api] base_port = 0, [monitor] port = 0) each such child binds 127.0.0.1:0 and the
kernel picks a free port, so two appliances with their own data dirs run side by side with
nothing to plan. The child announces what it got before it serves: it writes "127.0.0.1:PORT"
(atomically) to the file the supervisor named in APPLIANCE_ADDRESS_FILE, and into its heartbeat
row (/health/nodes). The supervisor reads the file back to probe the child, to publish it to the
balancer in upstreams.json and to show it in `appliance status`. A fixed port, an operator's
opt-in (say, to scrape one worker directly), is announced the same way.

Why ports the kernel picks rather than Unix sockets: the balancer's connect code, its health
probes and every client of a worker (curl, a scraper, the API's peer-address fallback) keep
talking loopback TCP exactly as before, and no data-dir path runs into the 108-byte limit of a
socket path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from appliance.contract import ADDRESS_FILE_ENV

HOST = "127.0.0.1"


def port_for(configured: int, index: int = 0) -> int:
    """The port to bind: configured + index when the operator pinned one, else 0 (the kernel picks)."""
    return configured + index if configured else 0


def announce(port: int, env: Mapping[str, str] | None = None) -> str:
    """Tell the supervisor (and /health/nodes) the port this process listens on; returns "127.0.0.1:PORT"."""
    from appliance import heartbeat

    address = f"{HOST}:{port}"
    heartbeat.set_info(address=address)
    target = (os.environ if env is None else env).get(ADDRESS_FILE_ENV)
    if target:
        path = Path(target)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(address)
        os.replace(tmp, path)  # the supervisor never reads half an address
    return address


def read(path: Path) -> str | None:
    """The address a child announced in `path`, or None while there is none (or it is not a loopback host:port)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    host, _, port = text.rpartition(":")
    if host != HOST or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return text
