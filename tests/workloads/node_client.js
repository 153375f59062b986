// Keep-alive client for Weft's probe tests: N sequential GETs on one connection, prints statuses.
// Usage: node node_client.js HOST PORT PATH N
const http = require("http");
const [host, port, path, n] = process.argv.slice(2);
const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
let left = Number(n);
function one() {
  http.get({ host, port: Number(port), path, agent }, (res) => {
    res.resume();
    res.on("end", () => {
      console.log(res.statusCode);
      if (--left > 0) one();
      else agent.destroy();
    });
  });
}
one();
