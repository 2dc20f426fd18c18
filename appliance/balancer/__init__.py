"""The balancer: the appliance's public port, an asyncio HTTP/1.1 reverse proxy.

Modules, each of one job:
  server     `serve(cfg, index)`, the role: sockets, signals, upkeep, graceful stop
  proxy      the per-request path (ClientConnection) and what it shares (Proxy)
  exchange   one request upstream and back (Exchange, the upstream answer's handler; the line
             for upstream slots: wait_for_slot, wake_group)
  admission  the token hook and the limiter as one verdict
  writer     HTTP/1.1 writing without I/O: heads, chunking, keep-alive, error answers
  ids        request and trace ids
  clients    the client address behind trusted proxies and its signed line
  framing    HTTP/1.1 framing over httptools plus the anti-smuggling rules; ProtocolError
  pool       keep-alive upstream connections
  picker     least-connection picking with weights (Upstream, Group)
  upstream_state  the upstream state table: healthy, unhealthy, ejected, draining
             (active probes and passive failures move it)
  upstreams  UpstreamTable: groups, routes, the supervisor's control file and
             balancer-state.json; active probes
  listeners  closing the public sockets in a stop without resetting a client in the backlog
  stats      counters flushed to prometheus once a second; the access log
  certs      TLS contexts, SIGHUP reload, `init --tls self-signed`
  limiter    rate-limit zones (memory, Redis, or shared_buckets)
  shared_buckets  the buckets of the host's balancer processes ([balancer] processes > 1, no Redis):
             one mmap'd file in the run dir, a flock per decision
  prefixes   route-prefix matching shared by limiter zones and public routes
  authhook   token validation (jwt, subrequest, callable)
"""
