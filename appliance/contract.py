"""Names the supervisor and its children agree on: environment variables and run files.

Both sides import these (appliance/supervisor and the roles, e.g. the balancer), so a
rename cannot leave one side reading what the other no longer writes.
"""

from __future__ import annotations

# Environment: the public listening sockets the supervisor hands to each balancer, "fd,fd,...".
LISTEN_FDS_ENV = "APPLIANCE_LISTEN_FDS"
# Environment of every child: the whole config tree as JSON (parsed once, by the supervisor: child_config.py),
CONFIG_ENV = "APPLIANCE_CONFIG_JSON"
# the file its heartbeat touches (heartbeat.py) and the supervisor's pid (a child whose parent changed stops).
HEARTBEAT_FILE_ENV = "APPLIANCE_HEARTBEAT_FILE"
SUPERVISOR_PID_ENV = "APPLIANCE_SUPERVISOR_PID"

# The exit status of a child that cannot boot (bad config, a broken operator file, an address in use):
# the supervisor does not retry it forever.
EXIT_BOOT_FAILURE = 3

# Files under <data_dir>/RUN_DIR (locks, sockets, heartbeats: rebuilt at every start).
RUN_DIR = "run"
UPSTREAMS_FILE = "upstreams.json"  # supervisor -> balancer: the local upstream groups, versioned
BALANCER_STATE_FILE = "balancer-state.json"  # balancer -> supervisor: what it applied, in flight per upstream


def balancer_state_file(index: int) -> str:
    """The state file of balancer process `index` ([balancer] processes): the first keeps the plain name."""
    if index == 0:
        return BALANCER_STATE_FILE
    stem, _, ext = BALANCER_STATE_FILE.rpartition(".")
    return f"{stem}-{index}.{ext}"


# Rate-limit buckets the balancer processes of one host share when [balancer] processes > 1 and no Redis
# (appliance/balancer/shared_buckets.py); the supervisor removes it at start.
RATE_LIMIT_FILE = "rate-limits.buckets"

# Environment: the file an internal listener (api worker, monitor) writes the loopback "host:port" it bound to,
# so the supervisor learns a port the kernel picked (appliance/listen_address.py).
ADDRESS_FILE_ENV = "APPLIANCE_ADDRESS_FILE"
ADDRESS_DIR = "addresses"  # under RUN_DIR: one file per process, named like its heartbeat file
