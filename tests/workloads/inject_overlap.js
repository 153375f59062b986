// Event-loop server for tests/integration/test_probe_inject.py: a request waits until `hold`
// requests are open at once (all read by this one thread), then each calls the downstream and
// answers with what the downstream reported. With two open, the thread's sends cannot be told
// apart: the injector must add no traceparent rather than a wrong one.
const http = require("http");
const [port, downstream, hold] = process.argv.slice(2).map(Number);
const agent = new http.Agent({ keepAlive: false });
let waiting = [];
const server = http.createServer((req, res) => {
  const incoming = req.headers["traceparent"] || "";
  req.resume();
  waiting.push(() => {
    http.get({ host: "127.0.0.1", port: downstream, path: "/from-loop", agent }, (down) => {
      let text = "";
      down.on("data", (d) => (text += d));
      down.on("end", () => {
        const body = JSON.stringify({ incoming, down: JSON.parse(text) });
        res.writeHead(200, { "Content-Length": Buffer.byteLength(body) });
        res.end(body);
      });
    });
  });
  if (waiting.length >= hold) {
    const go = waiting;
    waiting = [];
    go.forEach((f) => f());
  }
});
server.listen(port, "127.0.0.1", () => console.log("ready"));
