// Debian's chromium, headless, as the browser tests start it: the flags
// keep it off the network (this machine's is closed; background requests
// would be refused by the dozen) and out of the sandbox (tests run as root).

import { chromium } from 'playwright-core';

const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';

export function launch() {
  return chromium.launch({
    executablePath,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
}
