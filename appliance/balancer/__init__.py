"""The balancer: the appliance's public port, an asyncio HTTP/1.1 reverse proxy.

Modules, each of one job:
  server     `serve(cfg, index)`, the role: sockets, signals, upkeep, graceful stop
  proxy      the per-request path (ClientConnection) and what it shares (Proxy)
  framing    HTTP/1.1 framing over httptools plus the anti-smuggling rules; ProtocolError
  pool       keep-alive upstream connections
  picker     least-connection picking with weights (Upstream, Group)
  health     the upstream health transition table (active and passive evidence)
  upstreams  groups, routes, the supervisor's control file and balancer-state.json; active probes
  stats      counters flushed to prometheus once a second; the access log
  certs      TLS contexts, SIGHUP reload, `init --tls self-signed`
  limiter    rate-limit zones (memory or Redis)
  authhook   token validation (jwt, subrequest, callable)
"""
