// A plain Node http server for Weft's probe tests: any path -> 200 "ok <path>" (404 for /missing).
// Usage: node node_server.js HOST PORT
const http = require("http");
const [host, port] = process.argv.slice(2);
http
  .createServer((req, res) => {
    const path = req.url.split("?")[0];
    res.statusCode = path === "/missing" ? 404 : 200;
    res.end("ok " + path);
  })
  .listen(Number(port), host);
