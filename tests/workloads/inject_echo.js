// Echo server for tests/integration/test_probe_inject.py: answers with the traceparent values
// the request carried (raw header list, so a duplicate would show), as JSON {"tp": [...]}.
const http = require("http");
const server = http.createServer((req, res) => {
  const tp = [];
  for (let i = 0; i < req.rawHeaders.length; i += 2) {
    if (req.rawHeaders[i].toLowerCase() === "traceparent") tp.push(req.rawHeaders[i + 1]);
  }
  req.resume();
  req.on("end", () => {
    const body = JSON.stringify({ tp });
    res.writeHead(200, { "Content-Length": Buffer.byteLength(body) });
    res.end(body);
  });
});
server.listen(Number(process.argv[2]), "127.0.0.1", () => console.log("ready"));
