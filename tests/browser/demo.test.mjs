// Real-browser test: the demo page in five tabs of one browser, and the
// status page watching them. Runs `tabmux demo` (the release binary) and
// Debian's chromium through playwright-core. Screenshots go to
// target/screenshots/ (not in git).
//
//   cargo build --release && (cd tests/browser && npm ci && npm test)

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { mkdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { launch } from './chromium.mjs';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const shots = path.join(root, 'target', 'screenshots');
const binary = process.env.TABMUX_BIN || path.join(root, 'target', 'release', 'tabmux');
const TIMEOUT = 20_000;

/** A free port p such that p+1 and p+2 are free too (the demo uses three). */
async function freeBase() {
  for (let attempt = 0; attempt < 50; attempt++) {
    const base = 20000 + Math.floor(Math.random() * 20000);
    const ok = await Promise.all([0, 1, 2].map((i) => new Promise((resolve) => {
      const s = createServer();
      s.once('error', () => resolve(false));
      s.listen(base + i, '127.0.0.1', () => s.close(() => resolve(true)));
    })));
    if (ok.every(Boolean)) return base;
  }
  throw new Error('no free ports');
}

/** Starts the demo; resolves with its page and admin URLs once it prints them. */
function startDemo(base) {
  const child = spawn(binary, ['demo', '--listen', `127.0.0.1:${base}`], {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, RUST_LOG: 'warn', NO_COLOR: '1' },
  });
  return new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`demo did not start: ${out}`)), TIMEOUT);
    child.stdout.on('data', (chunk) => {
      out += chunk;
      const page = out.match(/open (http:\/\/\S+\/) in several tabs/);
      const admin = out.match(/status and metrics: (http:\/\/\S+\/)/);
      if (page && admin) {
        clearTimeout(timer);
        resolve({ child, page: page[1], admin: admin[1] });
      }
    });
    child.once('exit', (code) => reject(new Error(`demo exited with ${code}: ${out}`)));
  });
}

let demo;
let browser;
after(async () => {
  await browser?.close();
  demo?.child.kill('SIGTERM');
});

test('five tabs of one browser share one upstream connection', { timeout: 120_000 }, async () => {
  mkdirSync(shots, { recursive: true });
  demo = await startDemo(await freeBase());
  browser = await launch();
  // One context: one cookie jar, like the tabs of one browser window.
  const context = await browser.newContext();
  const pages = [];
  for (let i = 0; i < 5; i++) {
    const page = await context.newPage();
    await page.goto(demo.page);
    pages.push(page);
  }
  const text = (page, id) => page.locator(`#${id}`).textContent();
  for (const page of pages) {
    // Each tab sees five tabs, and the backend's single connection.
    await page.waitForFunction(() => document.getElementById('tabs').textContent === '5', null, { timeout: TIMEOUT });
    assert.equal(await text(page, 'ups'), '1');
  }
  const ids = await Promise.all(pages.map((p) => text(p, 'you')));
  assert.deepEqual([...ids].sort(), ['t1', 't2', 't3', 't4', 't5']);

  // An id-addressed reply reaches only the tab that asked.
  await pages[2].click('#ping');
  await pages[2].waitForFunction(() => document.getElementById('log').textContent.includes('pong for'), null, { timeout: TIMEOUT });
  // A broadcast reaches every tab; after it, no other tab has a pong.
  await pages[0].fill('#text', 'hello everyone');
  await pages[0].click('#say');
  for (const page of pages) {
    await page.waitForFunction(() => document.getElementById('log').textContent.includes('says: hello everyone'), null, { timeout: TIMEOUT });
  }
  for (const [i, page] of pages.entries()) {
    const log = await text(page, 'log');
    assert.equal(log.includes('pong for'), i === 2, `tab ${i}: ${log}`);
  }
  await pages[4].screenshot({ path: path.join(shots, 'demo.png') });

  // The status page shows them: 5 tabs, 1 session, 1 upstream, 4 avoided.
  const status = await browser.newPage();
  await status.goto(demo.admin);
  await status.waitForFunction(() => document.getElementById('tabs').textContent === '5', null, { timeout: TIMEOUT });
  assert.equal(await text(status, 'sessions'), '1');
  assert.equal(await text(status, 'upstreams'), '1');
  assert.equal(await text(status, 'avoided'), '4');
  assert.match(await status.locator('table.top').first().textContent(), /[0-9a-f]{16}\s*5\s*up/);

  // Numbers change live: close two tabs.
  await pages[3].close();
  await pages[4].close();
  await status.waitForFunction(() => document.getElementById('tabs').textContent === '3', null, { timeout: TIMEOUT });
  assert.equal(await text(status, 'avoided'), '2');
  await status.screenshot({ path: path.join(shots, 'status.png'), fullPage: true });
});
