// The status page: polls the monitor's JSON every 2 s and draws tables and SVG charts.
// No library: every value is put in with textContent (never innerHTML), charts are SVG paths.
(function () {
  "use strict";
  var POLL_MS = 2000, HOUR = 3600, SVG = "http://www.w3.org/2000/svg";
  var points = [], since = 0;
  var LABELS = { e4xx: "4xx", e5xx: "5xx", ok_min: "ok", fail_min: "failed", login_fail_min: "failed", lockouts_min: "locks" };

  function $(id) { return document.getElementById(id); }
  function el(tag, attrs, text) {
    var e = tag.indexOf("svg:") === 0 ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function fmt(v, digits) {
    if (v === null || v === undefined || v === "") return "–";
    if (typeof v !== "number") return String(v);
    return v.toFixed(digits === undefined ? (Math.abs(v) >= 100 ? 0 : 1) : digits);
  }
  function pairs(obj) {
    var keys = Object.keys(obj || {}).sort();
    return keys.length ? keys.map(function (k) { return k + " " + fmt(obj[k], 0); }).join(", ") : "none";
  }
  function mb(v) { return v ? fmt(v / 1048576, 1) : "–"; }
  function ago(s) {
    if (s === null || s === undefined) return "–";
    if (s < 90) return Math.round(s) + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    return (s / 3600).toFixed(1) + " h";
  }

  async function getJSON(url) {
    var r = await fetch(url, { credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" } });
    if (r.status === 401 || r.status === 403) { window.location.assign("/status"); throw new Error("logged out"); }
    if (!r.ok) throw new Error(url + " answered " + r.status);
    return (await r.json()).data;
  }

  function rows(tbody, list, cells, rowClass) {
    var body = tbody.tagName === "TBODY" ? tbody : tbody.querySelector("tbody");
    var frag = document.createDocumentFragment();
    list.forEach(function (item) {
      var tr = el("tr", rowClass ? { "class": rowClass(item) || "" } : {});
      cells(item).forEach(function (c) {
        var td = el("td", c && c.cls ? { "class": c.cls } : {});
        if (c && c.node) td.appendChild(c.node); else td.textContent = c && c.text !== undefined ? c.text : (c === null || c === undefined ? "–" : String(c));
        tr.appendChild(td);
      });
      frag.appendChild(tr);
    });
    body.replaceChildren(frag);
  }

  function line(target, item) {
    var li = el("li", { "data-level": item.level });
    li.appendChild(el("span", { "class": "dot " + item.level, "aria-label": item.level }));
    li.appendChild(el("strong", {}, item.name));
    var extra = item.reason || item.detail;
    if (extra) li.appendChild(document.createTextNode(" — " + extra));
    target.appendChild(li);
  }

  // One SVG line chart of `keys` over the last hour; y from 0 to the largest value seen.
  function chart(id, keys, scale) {
    var svg = $(id), W = 320, H = 120, L = 30, B = 14, T = 6;
    // The x axis spans the history there is (at least 2 min, at most the hour kept), so a fresh start is readable.
    var now = points.length ? points[points.length - 1].t : Date.now() / 1000;
    var span = points.length ? Math.min(HOUR, Math.max(120, now - points[0].t)) : HOUR, t0 = now - span;
    var max = 0;
    points.forEach(function (p) { keys.forEach(function (k) { var v = p[k]; if (typeof v === "number") max = Math.max(max, v * (scale || 1)); }); });
    max = max > 0 ? max * 1.1 : 1;
    var frag = document.createDocumentFragment();
    frag.appendChild(el("svg:line", { "class": "axis", x1: L, y1: H - B, x2: W, y2: H - B }));
    frag.appendChild(el("svg:line", { "class": "axis", x1: L, y1: T, x2: L, y2: H - B }));
    frag.appendChild(el("svg:text", { x: 2, y: T + 8 }, fmt(max)));
    frag.appendChild(el("svg:text", { x: 2, y: H - B }, "0"));
    frag.appendChild(el("svg:text", { x: L, y: H - 2 }, "-" + Math.round(span / 60) + " min"));
    frag.appendChild(el("svg:text", { x: W - 24, y: H - 2 }, "now"));
    keys.forEach(function (k, i) {
      var d = "", pen = "M";
      points.forEach(function (p) {
        var v = p[k];
        if (typeof v !== "number") { pen = "M"; return; }
        if (p.t < t0) return;
        var x = L + (W - L) * (p.t - t0) / span, y = (H - B) - (H - B - T) * (v * (scale || 1)) / max;
        d += pen + x.toFixed(1) + " " + y.toFixed(1) + " ";
        pen = "L";
      });
      frag.appendChild(el("svg:path", { "class": "s" + i, d: d.trim() || "M0 0", "data-series": k }));
      if (keys.length > 1) frag.appendChild(el("svg:text", { "class": "legend t" + i, x: W - 40 * (keys.length - i), y: T + 8 }, LABELS[k] || k));
    });
    svg.replaceChildren(frag);
    svg.setAttribute("data-points", String(points.length));
  }

  function render(s) {
    var ov = $("overview-lines"); ov.replaceChildren();
    (s.overview || []).forEach(function (item) { line(ov, item); });
    var firing = $("alerts-firing"); firing.replaceChildren();
    var alerts = s.alerts || { firing: [], recent: [] };
    if (!alerts.firing.length) firing.appendChild(el("li", { "class": "muted" }, "no alert is firing"));
    alerts.firing.forEach(function (a) { line(firing, { level: "red", name: a.alert, reason: a.what + ": " + fmt(a.value) + (a.threshold !== null ? " (threshold " + a.threshold + ")" : "") }); });
    var recent = $("alerts-recent"); recent.replaceChildren();
    alerts.recent.forEach(function (a) { recent.appendChild(el("li", {}, new Date(a.at * 1000).toLocaleTimeString() + " " + a.alert + " " + a.state)); });

    var api = s.api || {}, lat = api.latency || {};
    $("api-now").textContent = api.error ? api.error : ("now: " + fmt(api.requests_per_s) + " req/s, p50 " + fmt(lat.p50) + " ms, p95 " + fmt(lat.p95) +
      " ms, p99 " + fmt(lat.p99) + " ms, 5xx share " + fmt(100 * (api.error_ratio || 0)) + " %, total " + fmt(api.requests_total, 0));
    $("api-now").setAttribute("data-rps", String(api.requests_per_s || 0));
    $("api-now").setAttribute("data-total", String(api.requests_total || 0));
    rows($("upstreams"), api.upstreams || [], function (u) {
      return [u.group, u.upstream, u.state, fmt(u.in_flight, 0), fmt(u.requests_per_s), fmt(u.failures_per_s)];
    }, function (u) { return u.state === "healthy" ? "" : "bad"; });

    var t = s.tasks || {};
    $("tasks-now").textContent = t.error ? t.error : ("queued " + fmt(t.queued, 0) + ", running " + fmt(t.running, 0) + ", last minute: " +
      fmt(t.succeeded_per_min, 0) + " succeeded, " + fmt(t.failed_per_min, 0) + " failed" +
      (t.success_ratio !== null && t.success_ratio !== undefined ? " (" + fmt(100 * t.success_ratio) + " % success)" : "") + ", oldest waiting " + ago(t.oldest_queued_age));
    rows($("task-types"), t.by_type || [], function (x) { return [x.task_type, x.succeeded, x.failed]; });
    rows($("task-failures"), t.recent_failures || [], function (f) {
      return [f.finished_at, f.task_type, { text: (f.error_code ? f.error_code + ": " : "") + f.error, cls: "err" },
        { node: el("a", { href: "/status/api/tasks/" + encodeURIComponent(f.id) + "/logs" }, "logs") }];
    });

    var h = s.host || {}, mem = h.memory || {}, disk = h.disk || {}, net = h.network || {};
    $("host-now").textContent = "host cpu " + fmt(h.cpu) + " % of " + (h.cpus || "?") + " cores, memory " + fmt(mem.percent) + " %, disk " +
      fmt(disk.free_percent) + " % free, load " + (h.load || []).join(" ") + ", network " + fmt((net.rx_bytes_per_s || 0) / 1024) + " / " + fmt((net.tx_bytes_per_s || 0) / 1024) + " KB/s in/out";
    var db = s.database || {}, rd = s.redis;
    $("stores-now").textContent = (db.reachable ? "database " + db.engine + ": round trip " + fmt(db.round_trip_ms, 2) + " ms, " + mb(db.size_bytes) + " MB" +
      (db.connections !== undefined ? ", " + db.connections + " connections" : "") : "database unreachable: " + (db.error || "?")) +
      (rd ? (rd.reachable ? "; redis: round trip " + fmt(rd.round_trip_ms, 2) + " ms, " + rd.connections + " clients, " + mb(rd.used_memory) + " MB"
        : "; redis unreachable: " + (rd.error || "?")) : "");
    rows($("hosts"), (s.cluster || {}).hosts || [], function (h) {
      return [h.host + (h.this ? " (this host)" : ""), { text: h.state, cls: h.state === "down" ? "state-bad" : "state-up" },
        h.beating + " of " + h.processes, h.last_heartbeat_age === null ? "–" : fmt(h.last_heartbeat_age, 0) + " s ago"];
    }, function (h) { return h.state === "down" ? "bad" : ""; });
    var procs = (s.processes || {}).rows || [];
    rows($("processes"), procs, function (p) {
      var bad = p.state !== "up" && p.state !== "draining";
      return [[p.role].concat(p.jobs || []).join(" + "), p.index, p.pid, { text: p.state, cls: bad ? "state-bad" : "state-up" }, p.restarts, ago(p.uptime), fmt(p.cpu), mb(p.rss), mb(p.pss), p.threads, p.open_files];
    }, function (p) {
      if (p.state !== "up" && p.state !== "draining") return "bad";
      return p.restarts > 0 && p.uptime !== null && p.uptime < 120 ? "warn restarted" : "";
    });

    var sec = s.security || {};
    $("security-now").textContent = sec.error ? sec.error : ("locked accounts " + sec.locked_accounts + ", locked addresses " + sec.locked_addresses +
      ", failed logins in the last hour " + sec.failed_logins_last_hour + "; rate-limited so far: " + pairs(api.rate_limited_total) +
      "; token rejections: " + pairs(api.auth_failures_total));
    rows($("top-addresses"), sec.top_addresses || [], function (a) { return [a.address, a.failures]; });
  }

  function drawCharts() {
    chart("chart-rps", ["rps"]);
    chart("chart-latency", ["p50", "p95", "p99"]);
    chart("chart-errors", ["e4xx", "e5xx"]);
    chart("chart-queue", ["queued", "running"]);
    chart("chart-throughput", ["ok_min", "fail_min"]);
    chart("chart-host", ["cpu", "mem"]);
    chart("chart-rss", ["rss"], 1 / 1048576);
    chart("chart-logins", ["login_fail_min", "lockouts_min"]);
    chart("chart-limited", ["limited"]);
  }

  async function tick() {
    try {
      var both = await Promise.all([getJSON("/status/api/snapshot"), getJSON("/status/api/history?since=" + since)]);
      var fresh = both[1].points || [];
      if (fresh.length) { points = points.concat(fresh); since = fresh[fresh.length - 1].t; }
      var cut = since - HOUR;
      while (points.length && points[0].t < cut) points.shift();
      if (both[0] && both[0].t) render(both[0]);
      drawCharts();
      document.body.classList.remove("stale");
      $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) {
      document.body.classList.add("stale");
      $("updated").textContent = "not updating: " + e.message;
    }
    setTimeout(tick, POLL_MS);
  }
  tick();
})();
