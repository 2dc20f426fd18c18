"""Names the supervisor and its children agree on: environment variables and run files.

Both sides import these (appliance/supervisor and the roles, e.g. the balancer), so a
rename cannot leave one side reading what the other no longer writes.
"""

from __future__ import annotations

# Environment: the public listening sockets the supervisor hands to each balancer, "fd,fd,...".
LISTEN_FDS_ENV = "APPLIANCE_LISTEN_FDS"

# Files under <data_dir>/RUN_DIR (locks, sockets, heartbeats: rebuilt at every start).
RUN_DIR = "run"
UPSTREAMS_FILE = "upstreams.json"  # supervisor -> balancer: the local upstream groups, versioned
BALANCER_STATE_FILE = "balancer-state.json"  # balancer -> supervisor: what it applied, in flight per upstream
