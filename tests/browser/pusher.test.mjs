// Real-browser test of a Pusher route: pusher-js (npm) in four pages of
// one Chromium context (one browser: one cookie jar), through tabmux, in
// front of a real Pusher-protocol server (sockudo, from crates.io; .ci/run
// installs it). One page unsubscribes; an event triggered through the REST
// API reaches the other three exactly once; sockudo counts one connection.
//
//   cargo build --release && cargo install sockudo --version 5.2.0 --locked \
//     --no-default-features --features local && (cd tests/browser && npm ci && npm test)

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash, createHmac } from 'node:crypto';
import { readFileSync, existsSync } from 'node:fs';
import { homedir } from 'node:os';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { launch } from './chromium.mjs';
import { freePort, listening, servePage, startTabmux as tabmux } from './harness.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '../..');
const binary = process.env.TABMUX_BIN || path.join(root, 'target', 'release', 'tabmux');
const cargoSockudo = path.join(process.env.CARGO_HOME || path.join(homedir(), '.cargo'), 'bin', 'sockudo');
const sockudoPath = process.env.SOCKUDO_BIN || (existsSync(cargoSockudo) ? cargoSockudo : 'sockudo');
const TIMEOUT = 20_000;
const APP = { id: 'app-id', key: 'app-key', secret: 'app-secret' };

function startSockudo(port, metricsPort) {
  return spawn(sockudoPath, [], {
    stdio: 'ignore',
    env: {
      PATH: process.env.PATH, HOST: '127.0.0.1', PORT: String(port),
      METRICS_ENABLED: 'true', METRICS_HOST: '127.0.0.1', METRICS_PORT: String(metricsPort),
      ADAPTER_DRIVER: 'local', CACHE_DRIVER: 'memory', QUEUE_DRIVER: 'none',
      APP_MANAGER_DRIVER: 'memory', RATE_LIMITER_ENABLED: 'false', RATE_LIMITER_DRIVER: 'memory',
      SOCKUDO_DEFAULT_APP_ID: APP.id, SOCKUDO_DEFAULT_APP_KEY: APP.key,
      SOCKUDO_DEFAULT_APP_SECRET: APP.secret, SOCKUDO_DEFAULT_APP_ENABLED: 'true',
      SOCKUDO_DEFAULT_APP_ENABLE_CLIENT_MESSAGES: 'true',
    },
  });
}

function startTabmux(port, sockudoPort, origin) {
  return tabmux(binary, port, `path = "/app/${APP.key}"
upstream = "ws://127.0.0.1:${sockudoPort}/app/${APP.key}"
allowed_origins = ["${origin}"]
envelope = "pusher"
`);
}

/** The page every tab loads: pusher-js pointed at tabmux, with the
 *  browser's session cookie, recording what it receives. */
function startPage(port, tabmuxPort) {
  const pusherJs = readFileSync(path.join(here, 'node_modules/pusher-js/dist/web/pusher.min.js'));
  const html = `<!doctype html><meta charset="utf-8"><title>pusher tab</title>
<script src="/pusher.min.js"></script>
<script>
  window.received = [];
  window.pusher = new Pusher('${APP.key}', {
    wsHost: '127.0.0.1', wsPort: ${tabmuxPort}, forceTLS: false,
    enabledTransports: ['ws'], cluster: 'mt1', disableStats: true,
  });
  window.channel = pusher.subscribe('news');
  channel.bind('pusher:subscription_succeeded', () => { window.subscribed = true; });
  channel.bind('update', (data) => window.received.push(data));
  pusher.connection.bind('connected', () => { window.socketId = pusher.connection.socket_id; });
</script>`;
  return servePage(port, 'pusher.min.js', pusherJs, html);
}

/** Triggers `event` on `channel` through sockudo's REST API, signed as
 *  Pusher's HTTP API is. */
async function trigger(sockudoPort, channel, event, data) {
  const body = JSON.stringify({ name: event, channels: [channel], data: JSON.stringify(data) });
  const requestPath = `/apps/${APP.id}/events`;
  const params = {
    auth_key: APP.key,
    auth_timestamp: String(Math.floor(Date.now() / 1000)),
    auth_version: '1.0',
    body_md5: createHash('md5').update(body).digest('hex'),
  };
  const query = Object.keys(params).sort().map((k) => `${k}=${params[k]}`).join('&');
  const signature = createHmac('sha256', APP.secret).update(`POST\n${requestPath}\n${query}`).digest('hex');
  const res = await fetch(`http://127.0.0.1:${sockudoPort}${requestPath}?${query}&auth_signature=${signature}`, {
    method: 'POST', headers: { 'content-type': 'application/json' }, body,
  });
  assert.equal(res.status, 200, await res.text());
}

/** Pusher connections open, by sockudo's own count. */
async function connections(metricsPort) {
  const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
  return text.split('\n').filter((l) => l.startsWith('sockudo_connected'))
    .reduce((sum, l) => sum + Number(l.split(' ').pop()), 0);
}

const children = [];
let browser;
let pageServer;
after(async () => {
  await browser?.close();
  pageServer?.close();
  for (const child of children) child.kill('SIGTERM');
});

test('four pusher-js tabs of one browser: one connection, one delivery each', { timeout: 120_000 }, async () => {
  const [sockudoPort, metricsPort, tabmuxPort, pagePort] = await Promise.all([freePort(), freePort(), freePort(), freePort()]);
  const origin = `http://127.0.0.1:${pagePort}`;
  children.push(startSockudo(sockudoPort, metricsPort));
  await listening(sockudoPort, 'sockudo');
  await listening(metricsPort, "sockudo's metrics");
  children.push(startTabmux(tabmuxPort, sockudoPort, origin));
  await listening(tabmuxPort, 'tabmux');
  pageServer = await startPage(pagePort, tabmuxPort);

  browser = await launch();
  const context = await browser.newContext();
  const pages = [];
  for (let i = 0; i < 4; i++) {
    const page = await context.newPage();
    await page.goto(origin + '/');
    await page.waitForFunction(() => window.subscribed === true, null, { timeout: TIMEOUT });
    pages.push(page);
  }
  // One Pusher connection for the browser, one socket id for its tabs.
  assert.equal(await connections(metricsPort), 1);
  const ids = await Promise.all(pages.map((p) => p.evaluate(() => window.socketId)));
  assert.equal(new Set(ids).size, 1, `socket ids: ${ids}`);

  // One page unsubscribes; the others stay subscribed. It then subscribes
  // to another channel: tabmux handles a tab's frames in order, so once
  // that answer is back, the unsubscribe has been handled too.
  await pages[3].evaluate(() => new Promise((resolve) => {
    window.pusher.unsubscribe('news');
    window.pusher.subscribe('other').bind('pusher:subscription_succeeded', resolve);
  }));
  await trigger(sockudoPort, 'news', 'update', { n: 1 });
  for (const page of pages.slice(0, 3)) {
    await page.waitForFunction(() => window.received.length >= 1, null, { timeout: TIMEOUT });
  }
  // A second event is the barrier for "exactly once" and "nothing to the
  // page that left": by the time it arrives, a duplicate of the first would have too.
  await trigger(sockudoPort, 'news', 'update', { n: 2 });
  for (const page of pages.slice(0, 3)) {
    await page.waitForFunction(() => window.received.length >= 2, null, { timeout: TIMEOUT });
    assert.deepEqual(await page.evaluate(() => window.received), [{ n: 1 }, { n: 2 }]);
  }
  assert.deepEqual(await pages[3].evaluate(() => window.received), []);
  assert.equal(await connections(metricsPort), 1);
});
