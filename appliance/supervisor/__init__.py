"""The supervisor behind `appliance run`.

Offers: `main.run(args)` (the command), `commands.register` (`appliance status`,
`appliance systemd-unit`). Inside: arbiter.py (the loop), kinds.py (the table of
child kinds), roles.py (the table of roles, and `run_child`), template.py (the template's
side in the supervisor), child.py (a slot and its process), phases.py (startup and drain),
policy.py (restart backoff and crash loops), rollout.py (SIGHUP),
channel.py (upstreams.json / balancer-state.json), readiness.py, relay.py
(children's output), notify.py (systemd), control.py (status socket), lock.py
(one appliance per data dir), unit.py (the systemd unit).
"""
