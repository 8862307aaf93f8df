// Drives Debian's headless Chromium through berth's dashboard, as a person would: sign in, watch
// a Service applied through the CLI turn Ready without a reload, read its logs, run a command in
// its terminal, roll it back, download the backup evidence, and find that a viewer gets neither
// the controls nor the API's permission. tests/tests/dashboard.rs starts berth and runs this;
// every step prints one line, and the first failure ends the run with a non-zero exit.
//
// Environment: BERTH_URL, BERTH_BIN, BERTH_CA (for the CLI), ADMIN_TOKEN, VIEWER_TOKEN, SERVICE,
// MANIFEST_V1, MANIFEST_V2, MANIFEST_QUIET (SERVICE-quiet, no replicas), SNAPSHOT (an id the evidence must list), SCREENSHOTS (a directory,
// optional), CHROMIUM (default /usr/bin/chromium).
import { chromium } from "playwright-core";
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const URL_ = env("BERTH_URL");
const SERVICE = env("SERVICE");
const started = Date.now();
const step = (what) => console.log(`[${((Date.now() - started) / 1000).toFixed(1)}s] ${what}`);

function cli(...args) {
  return execFileSync(env("BERTH_BIN"), args, {
    env: { ...process.env, BERTH_URL: URL_, BERTH_TOKEN: env("ADMIN_TOKEN"), BERTH_CA: env("BERTH_CA") },
    encoding: "utf8",
  });
}

// Chromium aborts requests in flight when the machine's network interfaces change, and the other
// e2e tests create and remove Docker networks all the time: a navigation aborted for that reason
// is made again (the page's own requests retry by themselves, see app.js).
const NETWORK_CHANGED = "ERR_NETWORK_CHANGED";
// What the browser logs that the test causes on purpose: the restart cuts the event stream, and
// the page's reconnects meet a server that is not up yet.
const EXPECTED = [NETWORK_CHANGED, "ERR_INCOMPLETE_CHUNKED_ENCODING", "ERR_CONNECTION_REFUSED"];
async function navigate(what, fn) {
  for (let i = 1; ; i += 1) {
    try {
      return await fn();
    } catch (e) {
      if (i >= 4 || !String(e).includes(NETWORK_CHANGED)) throw e;
      step(`${what}: ${NETWORK_CHANGED}, once more`);
    }
  }
}

// Asks the test (tests/tests/dashboard.rs) to restart berth, and waits until it has.
const stdinLines = (async function* () {
  let buf = "";
  for await (const chunk of process.stdin) {
    buf += chunk;
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      yield buf.slice(0, i);
      buf = buf.slice(i + 1);
    }
  }
})();
async function restartBerth() {
  console.log("RESTART-BERTH");
  const { value } = await stdinLines.next();
  check(value === "restarted", `the test restarted berth: ${value}`);
}

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  // As root in a container, without a GPU, and without the background traffic this machine's
  // closed network refuses.
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});

async function signIn(token) {
  // The test's berth serves its internal CA's certificate: trusting it here is the test's
  // stand-in for installing that CA in a browser.
  const context = await browser.newContext({ ignoreHTTPSErrors: true, acceptDownloads: true, viewport: { width: 1360, height: 900 } });
  const page = await context.newPage();
  const problems = [];
  page.on("console", (m) => { if (m.type() === "error" && !EXPECTED.some((e) => m.text().includes(e))) problems.push(m.text()); });
  page.on("pageerror", (e) => problems.push(String(e)));
  await navigate("sign-in", async () => {
    await context.clearCookies();
    await page.goto(`${URL_}/ui/`);
    check(page.url().endsWith("/ui/login"), `an anonymous visit goes to the sign-in form, not ${page.url()}`);
    await page.fill("#token", token);
    await Promise.all([page.waitForURL(`${URL_}/ui/`), page.click("button[type=submit]")]);
  });
  const cookies = await context.cookies();
  const session = cookies.find((c) => c.name === "berth_session");
  check(session && session.httpOnly && session.secure && session.sameSite === "Strict",
    `the session cookie is HttpOnly, Secure, SameSite=Strict: ${JSON.stringify(session && { ...session, value: "…" })}`);
  check(await page.evaluate(() => !document.cookie.includes("berth_session")), "page scripts cannot read the session cookie");
  return { context, page, problems };
}

let failed = false;
try {
  // --- admin ---
  const admin = await signIn(env("ADMIN_TOKEN"));
  const page = admin.page;
  step(`signed in as ${await page.textContent("#whoami")}`);
  check((await page.textContent("#whoami")).includes("admin"), "the header names the token");
  check(await page.locator(`#svc-${SERVICE}`).count() === 0, "the Service is not there before the apply");

  let navigations = 0;
  page.on("framenavigated", (f) => { if (f === page.mainFrame()) navigations += 1; });
  await page.waitForFunction(() => document.body.dataset.live === "connected");
  cli("apply", "-f", env("MANIFEST_V1"));
  step("applied v1 through the CLI");
  await page.waitForSelector(`#svc-${SERVICE}[data-state="Ready"]`, { timeout: 120_000 });
  check(navigations === 0, `the row turned Ready without a reload (${navigations} navigations)`);
  step(`row turned Ready live: ${(await page.textContent(`#svc-${SERVICE}`)).replace(/\s+/g, " ")}`);
  if (process.env.SCREENSHOTS) await page.screenshot({ path: `${process.env.SCREENSHOTS}/dashboard-overview.png`, fullPage: true });

  // berth restarts (the test kills it and starts it again on the same data); a Service applied
  // and settled before the page reconnects sends no event after, and shows all the same: the
  // page reads its table again when its stream is back.
  const resynced = page.waitForRequest((r) => r.url().includes("/ui/sections/services"), { timeout: 60_000 });
  await restartBerth();
  await page.waitForFunction(() => document.body.dataset.live === "disconnected", null, { timeout: 30_000 });
  cli("apply", "-f", env("MANIFEST_QUIET"));
  cli("wait", "service", `${SERVICE}-quiet`, "--for", "condition=Ready", "--timeout", "60s");
  await resynced;
  await page.waitForSelector(`#svc-${SERVICE}-quiet[data-state="Ready"]`, { timeout: 30_000 });
  check(navigations === 0, `the page caught up without a reload (${navigations} navigations)`);
  step("after berth restarted, the page read its table again and shows the Service applied meanwhile");

  // A second revision, so that there is one to go back to.
  cli("apply", "-f", env("MANIFEST_V2"));
  cli("rollout", "status", "service", SERVICE, "--timeout", "120s");
  step("rolled out v2 through the CLI");

  await navigate("service page", async () => {
    if (page.url().endsWith(`/ui/services/${SERVICE}`)) await page.reload();
    else await Promise.all([page.waitForURL(`**/ui/services/${SERVICE}`), page.click(`#svc-${SERVICE} a`)]);
  });
  await page.waitForFunction(
    () => [...document.querySelectorAll("#logs div")].some((d) => d.textContent.includes("dashboard-log-line")),
    null, { timeout: 60_000 });
  step("saw the line the service printed in its logs");
  await page.waitForSelector("#tasks-body tr", { timeout: 30_000 });

  // The terminal: `echo hi` in a shell in the task, and `hi` on a line of its own.
  await page.click("#terminal-form button[type=submit]");
  await page.waitForSelector('#terminal[data-state="open"]', { timeout: 30_000 });
  await page.click("#terminal .xterm");
  await page.keyboard.type("echo hi\n");
  await page.waitForFunction(
    () => [...document.querySelectorAll("#terminal .xterm-rows > div")].some((r) => r.textContent.trim() === "hi"),
    null, { timeout: 30_000 });
  step("the web terminal ran `echo hi` and showed `hi`");
  if (process.env.SCREENSHOTS) await page.screenshot({ path: `${process.env.SCREENSHOTS}/dashboard-service.png`, fullPage: true });

  // Undo, as `berth rollout undo` does it.
  const undo = page.locator('button.undo[data-revision="1"]');
  check(await undo.count() === 1, "an admin gets an undo button for revision 1");
  await undo.click();
  await page.waitForFunction(() => document.getElementById("undo-result").textContent.includes("rolled back"), null, { timeout: 15_000 });
  const image = JSON.parse(cli("get", "service", SERVICE, "-o", "json")).spec.image;
  check(image.startsWith("berth-test/busybox:1"), `undo set the image back to revision 1's: ${image}`);
  step(`undo rolled back to ${image}`);

  // Backups: the evidence as a CSV download that lists the snapshot.
  await navigate("backups page", () => page.goto(`${URL_}/ui/backups`));
  check(await page.locator(`tr[data-snapshot="${env("SNAPSHOT")}"]`).count() === 1, "the snapshot is listed");
  const [download] = await navigate("evidence download", () => Promise.all([page.waitForEvent("download"), page.click("#evidence-csv")]));
  const csv = readFileSync(await download.path(), "utf8");
  check(csv.startsWith("snapshot,time_utc,plan,"), `the evidence CSV has its header: ${csv.slice(0, 80)}`);
  check(csv.includes(env("SNAPSHOT")), "the evidence CSV lists the snapshot");
  step(`downloaded ${download.suggestedFilename()} (${csv.split("\n").length - 2} snapshot rows)`);

  await navigate("audit page", () => page.goto(`${URL_}/ui/audit`));
  check((await page.textContent("#audit-verify")).includes("chain intact"), "the audit chain verifies");
  check((await page.textContent("#audit")).includes("sign-in"), "the sign-in is in the audit trail");
  step("audit page: chain intact, sign-in recorded");
  check(admin.problems.length === 0, `no errors in the page's console: ${admin.problems.join(" | ")}`);

  // --- viewer ---
  const viewer = await signIn(env("VIEWER_TOKEN"));
  const vpage = viewer.page;
  await navigate("viewer's service page", () => vpage.goto(`${URL_}/ui/services/${SERVICE}`));
  check(await vpage.locator("button.undo").count() === 0, "a viewer gets no undo button");
  check(await vpage.locator("#terminal-section").count() === 0, "a viewer gets no terminal");
  const patch = await vpage.locator("[data-service]").getAttribute("data-api");
  const tried = await navigate("viewer's undo", () => vpage.evaluate(async (path) => {
    const r = await window.berth.api("PATCH", path, JSON.stringify({ spec: { image: "berth-test/busybox:2" } }), "application/merge-patch+json");
    return { status: r.status, message: r.json?.message };
  }, patch));
  check(tried.status === 403, `the API refuses a viewer's undo with 403: ${JSON.stringify(tried)}`);
  step(`viewer: no undo button, no terminal; the API answered ${tried.status}: ${tried.message}`);
  const audit = await navigate("viewer's audit page", () => vpage.goto(`${URL_}/ui/audit`));
  check(audit.status() === 403, `a viewer may not read the audit page: ${audit.status()}`);
  check(viewer.problems.every((p) => p.includes("403")), `no errors in the viewer's console but the refusals: ${viewer.problems.join(" | ")}`);
  step("passed");
} catch (e) {
  failed = true;
  console.error(String(e && e.stack || e));
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
