// A Node demo service (stdlib http only): `node node_service.js CONFIG_JSON`.
//
// CONFIG_JSON is the same as py_service.py's. GET /<service>/r-<rid> calls each downstream `to`
// at /<to>/r-<rid>.<to> one after the other (mode "thread": Node's one event-loop thread)
// through a keep-alive http.Agent. The true parent travels by hand in x-truth-parent /
// x-truth-hop and is written to the truth file (JSON lines).
"use strict";
const fs = require("fs");
const http = require("http");

const cfg = JSON.parse(process.argv[2]);
const truth = fs.openSync(cfg.truth, "a");
const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });

function log(rid, parentRid, role, hop, peer) {
  const row = { rid, parent_rid: parentRid, role, service: cfg.service, hop };
  if (peer) row.peer = peer;
  fs.writeSync(truth, JSON.stringify(row) + "\n");
}

function call(c, rid) {
  const child = `${rid}.${c.to}`;
  log(child, rid, "client", "thread");
  const [host, port] = [c.addr.slice(0, c.addr.lastIndexOf(":")), c.addr.slice(c.addr.lastIndexOf(":") + 1)];
  return new Promise((resolve) => {
    const req = http.get(
      { host, port: Number(port), path: `/${c.to}/r-${child}`, agent,
        headers: { "x-truth-parent": rid, "x-truth-hop": c.hop } },
      (res) => {
        res.resume();
        res.on("end", () => resolve(res.statusCode));
      });
    req.on("error", () => resolve(599));
  });
}

async function handle(rid) {
  let worst = 200;
  for (const c of cfg.calls || []) {
    worst = Math.max(worst, await call(c, rid));
  }
  return worst;
}

const prefix = `/${cfg.service}/r-`;
const server = http.createServer(async (req, res) => {
  const path = req.url.split("?")[0];
  let status = 404;
  if (path.startsWith(prefix)) {
    const rid = path.slice(prefix.length);
    log(rid, req.headers["x-truth-parent"] || "", "server", req.headers["x-truth-hop"] || "cross_node",
        req.socket.remoteAddress);
    status = await handle(rid);
  } else if (path === "/health") {
    status = 200;
  }
  res.statusCode = status >= 400 ? 502 : 200;
  res.end(`${cfg.service} ${status}\n`);
});
server.keepAliveTimeout = 0; // keep pooled client connections open: no idle close races
const [host, port] = [cfg.listen.slice(0, cfg.listen.lastIndexOf(":")), cfg.listen.slice(cfg.listen.lastIndexOf(":") + 1)];
server.listen(Number(port), host);
