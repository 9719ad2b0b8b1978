// What the browser tests share: loopback ports (a free one, and waiting
// until something listens on one), tabmux started with one route, and the
// page every tab loads.

import { createServer, connect } from 'node:net';
import { createServer as createHttpServer } from 'node:http';
import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

const TIMEOUT = 20_000;

/** A free loopback port. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** Resolves once something accepts connections on `port`. */
export async function listening(port, what) {
  const deadline = Date.now() + TIMEOUT;
  while (Date.now() < deadline) {
    const up = await new Promise((resolve) => {
      const c = connect(port, '127.0.0.1', () => { c.destroy(); resolve(true); });
      c.once('error', () => resolve(false));
    });
    if (up) return;
    await new Promise((r) => setImmediate(r));
  }
  throw new Error(`${what} did not listen on ${port}`);
}

/** tabmux (`binary`) listening on `port` with one `[[route]]` (TOML). */
export function startTabmux(binary, port, route) {
  const dir = mkdtempSync(path.join(tmpdir(), 'tabmux-browser-'));
  const config = path.join(dir, 'proxy.toml');
  writeFileSync(config, `[server]
listen = "127.0.0.1:${port}"
[admin]
listen = "127.0.0.1:0"
[log]
level = "warn"
[[route]]
${route}`);
  return spawn(binary, ['--config', config], { stdio: 'ignore', env: { ...process.env, NO_COLOR: '1' } });
}

/** Serves the page every tab loads (`html`, with the browser's session
 *  cookie: cookies ignore ports, so it reaches tabmux too) and the client
 *  library it loads from `/<script>`. */
export function servePage(port, script, scriptBody, html) {
  const server = createHttpServer((req, res) => {
    if (req.url === `/${script}`) {
      res.writeHead(200, { 'content-type': 'application/javascript' });
      return res.end(scriptBody);
    }
    res.writeHead(200, { 'content-type': 'text/html', 'set-cookie': 'sessionid=browser-1; Path=/' });
    res.end(html);
  });
  return new Promise((resolve) => server.listen(port, '127.0.0.1', () => resolve(server)));
}
