"""Appliance: one executable that runs a complete high-availability API service.

The shared core lives here (config, logs, times, passwords, tokens, identity,
revocation, db); the roles live in the subpackages balancer, api, queue and
monitor, which use the core but not each other. Only appliance.supervisor
knows every role.
"""

__version__ = "0.1.0"
