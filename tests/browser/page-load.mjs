// Times dashboard pages in Debian's headless Chromium: signs in, then loads each page LOADS times
// (after one warm-up load) and prints one JSON line per page with the Navigation Timing figures
// of every load, in ms from the start of the navigation. `berth-bench dashboard` runs it.
//
// Environment: BERTH_URL, TOKEN, PAGES (comma-separated paths), LOADS, CHROMIUM (optional).
import { chromium } from "playwright-core";

const URL_ = process.env.BERTH_URL;
const loads = Number(process.env.LOADS || 20);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  await page.goto(`${URL_}/ui/login`);
  await page.fill("#token", process.env.TOKEN);
  await Promise.all([page.waitForURL(`${URL_}/ui/`), page.click("button[type=submit]")]);
  for (const path of process.env.PAGES.split(",")) {
    const runs = [];
    for (let i = 0; i <= loads; i += 1) {
      await page.goto(`${URL_}${path}`, { waitUntil: "load" });
      const t = await page.evaluate(() => {
        const n = performance.getEntriesByType("navigation")[0];
        return { ttfb: n.responseStart, response: n.responseEnd, dcl: n.domContentLoadedEventEnd, load: n.loadEventEnd, bytes: n.transferSize };
      });
      if (i > 0) runs.push(t);
    }
    console.log(JSON.stringify({ path, runs }));
  }
} finally {
  await browser.close();
}
