// The README's dashboard screenshots, taken from a running berth (the demo's, for example):
//   scripts/demo && BERTH_URL=https://127.0.0.1:7474 TOKEN="$(cat /var/lib/berth-demo/admin.token)" \
//     SERVICE=demo-web OUT=docs/img node tests/browser/screenshots.mjs
// It signs in, then captures the overview, and the Service's page with its logs and a terminal
// that ran `cat /version`.
import { chromium } from "playwright-core";

const { BERTH_URL: url, TOKEN: token, SERVICE: service, OUT: out } = process.env;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1360, height: 900 } });
  const page = await context.newPage();
  await page.goto(`${url}/ui/login`);
  await page.fill("#token", token);
  await Promise.all([page.waitForURL(`${url}/ui/`), page.click("button[type=submit]")]);
  await page.waitForFunction(() => document.body.dataset.live === "connected");
  await page.screenshot({ path: `${out}/dashboard-overview.png`, fullPage: true });
  await page.goto(`${url}/ui/services/${service}`);
  // A service that logged nothing has an empty log box: shown as it is.
  await page.waitForSelector("#logs div", { timeout: 10_000 }).catch(() => {});
  await page.waitForSelector("#tasks-body tr", { timeout: 30_000 });
  await page.click("#terminal-form button[type=submit]");
  await page.waitForSelector('#terminal[data-state="open"]', { timeout: 30_000 });
  await page.click("#terminal .xterm");
  await page.keyboard.type("cat /version\n");
  await page.waitForTimeout(1000);
  await page.screenshot({ path: `${out}/dashboard-service.png`, fullPage: true });
} finally {
  await browser.close();
}
