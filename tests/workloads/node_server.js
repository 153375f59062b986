// A plain Node http server for Weft's probe tests: any path -> 200 "ok <path>" (404 for /missing),
// answered once the request's body is read, as a real handler does.
// Usage: node node_server.js HOST PORT
const http = require("http");
const [host, port] = process.argv.slice(2);
http
  .createServer((req, res) => {
    const path = req.url.split("?")[0];
    req.resume(); // the body, if any, read and dropped
    req.on("end", () => {
      res.statusCode = path === "/missing" ? 404 : 200;
      res.end("ok " + path);
    });
  })
  .listen(Number(port), host);
