// Real-browser test of an MQTT route: mqtt.js (its browser build, from npm)
// in four pages of one Chromium context (one browser: one cookie jar), all
// with one fixed client id, through tabmux in front of Debian's mosquitto
// (started here on free ports, with a TCP listener beside its websockets
// one). mosquitto sees one connection; a message published from outside
// (mqtt.js in node, over TCP) reaches each subscribed page once; no page is
// ever disconnected by a takeover; a page that unsubscribes stops receiving
// while the others go on.
//
//   cargo build --release && (cd tests/browser && npm ci && npm test)

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import mqtt from 'mqtt';
import { launch } from './chromium.mjs';
import { freePort, listening, servePage, startTabmux as tabmux } from './harness.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '../..');
const binary = process.env.TABMUX_BIN || path.join(root, 'target', 'release', 'tabmux');
const TIMEOUT = 20_000;

/** mosquitto on two free ports; its log tells what it accepted. */
async function startBroker(children) {
  const [tcp, ws] = await Promise.all([freePort(), freePort()]);
  const dir = mkdtempSync(path.join(tmpdir(), 'tabmux-mosquitto-'));
  const log = path.join(dir, 'log');
  const conf = path.join(dir, 'mosquitto.conf');
  writeFileSync(conf, `user root
per_listener_settings false
allow_anonymous true
persistence false
listener ${tcp} 127.0.0.1
listener ${ws} 127.0.0.1
protocol websockets
log_dest file ${log}
log_type all
connection_messages true
`);
  const bin = ['/usr/sbin/mosquitto', 'mosquitto'].find((b) => b === 'mosquitto' || readable(b));
  children.push(spawn(bin, ['-c', conf], { stdio: ['ignore', 'ignore', 'inherit'] }));
  await listening(tcp, 'mosquitto');
  await listening(ws, 'mosquitto (websockets)');
  return { tcp, ws, log: () => { try { return readFileSync(log, 'utf8'); } catch { return ''; } } };
}

function readable(file) {
  try { readFileSync(file, { length: 1 }); return true; } catch { return false; }
}

function count(text, needle) {
  return text.split('\n').filter((l) => l.includes(needle)).length;
}

/** The page every tab loads: mqtt.js pointed at tabmux with one fixed
 *  client id, subscribed to `plant/#`, recording what it receives and every
 *  time it goes offline. */
function startPage(port, tabmuxPort) {
  const client = readFileSync(path.join(here, 'node_modules/mqtt/dist/mqtt.min.js'));
  const html = `<!doctype html><meta charset="utf-8"><title>mqtt tab</title>
<script src="/mqtt.min.js"></script>
<script>
  window.received = [];
  window.offline = 0;
  window.client = mqtt.connect('ws://127.0.0.1:${tabmuxPort}/mqtt', {
    clientId: 'dashboard-user-1', protocolVersion: Number(new URLSearchParams(location.search).get('v')),
    reconnectPeriod: 200,
  });
  window.client.on('offline', () => { window.offline += 1; });
  window.client.on('message', (topic, payload) => window.received.push(topic + '=' + payload.toString()));
  window.client.on('connect', () => {
    window.client.subscribe('plant/#', { qos: 1 }, (err) => { window.subscribed = !err; });
  });
  window.unsubscribe = () => new Promise((resolve, reject) =>
    window.client.unsubscribe('plant/#', (err) => (err ? reject(err) : resolve(true))));
</script>`;
  return servePage(port, 'mqtt.min.js', client, html);
}

const children = [];
let browser;
let pageServer;
let outside;
after(async () => {
  await browser?.close();
  pageServer?.close();
  outside?.end(true);
  for (const child of children) child.kill('SIGTERM');
});

async function fourTabs(level) {
  const [tabmuxPort, pagePort] = await Promise.all([freePort(), freePort()]);
  const origin = `http://127.0.0.1:${pagePort}`;
  const broker = await startBroker(children);
  children.push(tabmux(binary, tabmuxPort, `path = "/mqtt"
upstream = "ws://127.0.0.1:${broker.ws}/mqtt"
allowed_origins = ["${origin}"]
envelope = "mqtt"
`));
  await listening(tabmuxPort, 'tabmux');
  pageServer = await startPage(pagePort, tabmuxPort);

  browser ??= await launch();
  const context = await browser.newContext();
  const pages = [];
  for (let i = 0; i < 4; i++) {
    const page = await context.newPage();
    await page.goto(`${origin}/?v=${level}`);
    await page.waitForFunction(() => window.subscribed === true, null, { timeout: TIMEOUT });
    pages.push(page);
  }
  assert.equal(count(broker.log(), 'New client connected'), 1, broker.log());

  outside?.end(true);
  outside = mqtt.connect(`mqtt://127.0.0.1:${broker.tcp}`, { clientId: 'outside', protocolVersion: level });
  await new Promise((resolve, reject) => { outside.once('connect', resolve); outside.once('error', reject); });
  await outside.publishAsync('plant/1/temperature', '21', { qos: 1 });
  for (const page of pages) {
    await page.waitForFunction(() => window.received.length >= 1, null, { timeout: TIMEOUT });
  }
  // One page unsubscribes; the others go on.
  assert.equal(await pages[3].evaluate(() => window.unsubscribe()), true);
  await outside.publishAsync('plant/1/temperature', '22', { qos: 1 });
  await outside.publishAsync('plant/2/temperature', '23', { qos: 0 });
  for (const page of pages.slice(0, 3)) {
    await page.waitForFunction(() => window.received.length >= 3, null, { timeout: TIMEOUT });
    assert.deepEqual(await page.evaluate(() => window.received),
      ['plant/1/temperature=21', 'plant/1/temperature=22', 'plant/2/temperature=23']);
  }
  assert.deepEqual(await pages[3].evaluate(() => window.received), ['plant/1/temperature=21']);
  for (const page of pages) {
    assert.equal(await page.evaluate(() => window.offline), 0, 'no page was ever disconnected');
  }
  const log = broker.log();
  assert.equal(count(log, 'New client connected'), 2, 'the session and the outside publisher');
  assert.equal(count(log, 'as dashboard-user-1'), 1, 'one connection with the fixed client id');
  assert.equal(count(log, 'Sending PUBLISH to dashboard-user-1'), 3, 'each message sent once to the browser');
  await context.close();
  pageServer.close();
}

for (const level of [4, 5]) {
  test(`four mqtt.js tabs of one browser with one fixed client id (MQTT ${level === 4 ? '3.1.1' : '5.0'}): one connection, no takeover, one delivery each`, { timeout: 120_000 }, () => fourTabs(level));
}
