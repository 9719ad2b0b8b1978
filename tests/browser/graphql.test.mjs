// Real-browser test of a GraphQL route: graphql-ws's own client (its browser
// build, from npm) in four pages of one Chromium context (one browser: one
// cookie jar), through tabmux with share_subscriptions = "events", in front
// of a real graphql-ws server (tests/graphql/server.mjs). The server counts
// one connection and one subscription; a publish reaches each page exactly
// once; a page that disposes its subscription stops receiving while the
// others go on.
//
//   cargo build --release && (cd tests/graphql && npm ci) && (cd tests/browser && npm ci && npm test)

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import path from 'node:path';
import { launch } from './chromium.mjs';
import { freePort, listening, servePage, startTabmux as tabmux } from './harness.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '../..');
const graphqlDir = path.join(root, 'tests', 'graphql');
const binary = process.env.TABMUX_BIN || path.join(root, 'target', 'release', 'tabmux');
const TIMEOUT = 20_000;

/** The GraphQL server; resolves with its port once it listens. */
function startServer(children) {
  const child = spawn('node', ['server.mjs'], { cwd: graphqlDir, stdio: ['ignore', 'pipe', 'inherit'] });
  children.push(child);
  return new Promise((resolve, reject) => {
    const lines = createInterface({ input: child.stdout });
    lines.once('line', (line) => {
      const port = Number(line.replace('listening ', ''));
      if (port) resolve(port);
      else reject(new Error(`unexpected: ${line}`));
    });
    child.once('exit', (code) => reject(new Error(`the GraphQL server exited (${code})`)));
  });
}

function startTabmux(port, serverPort, origin) {
  return tabmux(binary, port, `path = "/graphql"
upstream = "ws://127.0.0.1:${serverPort}/graphql"
allowed_origins = ["${origin}"]
envelope = "graphql"
share_subscriptions = "events"
`);
}

/** The page every tab loads: graphql-ws's client pointed at tabmux, with
 *  the browser's session cookie, recording the ticks it receives. */
function startPage(port, tabmuxPort) {
  const client = readFileSync(path.join(graphqlDir, 'node_modules/graphql-ws/umd/graphql-ws.min.js'));
  const html = `<!doctype html><meta charset="utf-8"><title>graphql tab</title>
<script src="/graphql-ws.min.js"></script>
<script>
  window.received = [];
  window.client = graphqlWs.createClient({
    url: 'ws://127.0.0.1:${tabmuxPort}/graphql',
    connectionParams: { token: 'a' },
    on: { connected: () => { window.connected = true; } },
  });
  window.dispose = window.client.subscribe(
    { query: 'subscription { ticks }' },
    { next: (r) => window.received.push(r.data.ticks), error: (e) => { window.failed = String(e); }, complete: () => {} },
  );
  window.query = (q) => new Promise((resolve, reject) =>
    window.client.subscribe({ query: q }, { next: resolve, error: reject, complete: () => {} }));
</script>`;
  return servePage(port, 'graphql-ws.min.js', client, html);
}

async function stats(serverPort) {
  return (await fetch(`http://127.0.0.1:${serverPort}/stats`)).json();
}

async function until(what, check) {
  const deadline = Date.now() + TIMEOUT;
  while (Date.now() < deadline) {
    if (await check()) return;
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`timed out waiting for ${what}`);
}

const children = [];
let browser;
let pageServer;
after(async () => {
  await browser?.close();
  pageServer?.close();
  for (const child of children) child.kill('SIGTERM');
});

test('four graphql-ws tabs of one browser: one connection, one subscription, one delivery each', { timeout: 120_000 }, async () => {
  const [tabmuxPort, pagePort] = await Promise.all([freePort(), freePort()]);
  const origin = `http://127.0.0.1:${pagePort}`;
  const serverPort = await startServer(children);
  children.push(startTabmux(tabmuxPort, serverPort, origin));
  await listening(tabmuxPort, 'tabmux');
  pageServer = await startPage(pagePort, tabmuxPort);

  browser = await launch();
  const context = await browser.newContext();
  const pages = [];
  for (let i = 0; i < 4; i++) {
    const page = await context.newPage();
    await page.goto(origin + '/');
    await page.waitForFunction(() => window.connected === true, null, { timeout: TIMEOUT });
    // A query answered means the subscription sent before it is in place.
    assert.deepEqual(await page.evaluate(() => window.query('{ hello }')), { data: { hello: 'world' } });
    pages.push(page);
  }
  await until('one subscription at the server', async () => (await stats(serverPort)).subscriptions === 1);
  let s = await stats(serverPort);
  assert.equal(s.connectionsTotal, 1, JSON.stringify(s));
  assert.equal(s.subscriptionsStarted, 1, JSON.stringify(s));

  await fetch(`http://127.0.0.1:${serverPort}/publish?text=one`, { method: 'POST' });
  for (const page of pages) {
    await page.waitForFunction(() => window.received.length >= 1, null, { timeout: TIMEOUT });
  }
  // One page disposes its subscription; a query behind it is the barrier
  // (tabmux handles a tab's frames in order).
  await pages[3].evaluate(() => { window.dispose(); return window.query('{ hello }'); });
  await fetch(`http://127.0.0.1:${serverPort}/publish?text=two`, { method: 'POST' });
  for (const page of pages.slice(0, 3)) {
    await page.waitForFunction(() => window.received.length >= 2, null, { timeout: TIMEOUT });
    assert.deepEqual(await page.evaluate(() => window.received), ['one', 'two']);
  }
  // A third publish is the barrier for "nothing more to the page that left".
  await fetch(`http://127.0.0.1:${serverPort}/publish?text=three`, { method: 'POST' });
  for (const page of pages.slice(0, 3)) {
    await page.waitForFunction(() => window.received.length >= 3, null, { timeout: TIMEOUT });
  }
  assert.deepEqual(await pages[3].evaluate(() => window.received), ['one']);
  s = await stats(serverPort);
  assert.equal(s.connections, 1, JSON.stringify(s));
  assert.equal(s.subscriptions, 1, JSON.stringify(s));
  assert.equal(await pages[0].evaluate(() => window.failed), undefined);
});
