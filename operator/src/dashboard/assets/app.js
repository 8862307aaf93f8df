// berth dashboard: live updates from the event stream, a Service's tasks and logs, undo, and the
// terminal. Pages are rendered by the server; this only adds what needs a connection. Every
// request goes to the berth API with the session cookie; writes carry the page's CSRF token.
"use strict";

const meta = (name) => document.querySelector(`meta[name="${name}"]`)?.content ?? "";
const CSRF = meta("berth-csrf");
// Paths and names come from the page (the server's one definition of each, names.rs).
const PATHS = document.body.dataset;

// The terminal's renderer adds <style> elements; the page's policy admits them by this nonce.
const STYLE_NONCE = meta("berth-style-nonce");
const createElement = Document.prototype.createElement;
Document.prototype.createElement = function (tag, options) {
  const el = createElement.call(this, tag, options);
  if (String(tag).toLowerCase() === "style" && STYLE_NONCE) el.nonce = STYLE_NONCE;
  return el;
};

async function api(method, path, body, contentType) {
  const headers = { [PATHS.csrfHeader]: CSRF };
  if (body !== undefined) headers["content-type"] = contentType || "application/json";
  const resp = await fetch(path, { method, headers, body, credentials: "same-origin" });
  const text = await resp.text();
  let json = null;
  try { json = JSON.parse(text); } catch (_) { /* not JSON */ }
  return { status: resp.status, ok: resp.ok, json, text };
}

// A GET that tries again when the request did not get through (a network change, a server
// restart): a browser on a laptop meets both, and a page should not go stale over one.
async function get(url, tries = 3) {
  for (let i = 1; ; i += 1) {
    try {
      return await fetch(url, { credentials: "same-origin" });
    } catch (e) {
      if (i >= tries) throw e;
      await new Promise((r) => setTimeout(r, 500 * i));
    }
  }
}

// Reads a streamed response of JSON lines, calling `each` with every object (and `opened` once
// the response has started).
async function lines(path, each, signal, opened) {
  const resp = await fetch(path, { credentials: "same-origin", signal });
  if (!resp.ok || !resp.body) return resp.status;
  opened?.();
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, i).trim();
      buf = buf.slice(i + 1);
      if (line) {
        try { each(JSON.parse(line)); } catch (_) { /* a partial or foreign line */ }
      }
    }
  }
  return resp.status;
}

// Runs `fn` once per key after `ms` of quiet: a burst of events makes one request.
function debouncer(ms) {
  const timers = new Map();
  return (key, fn) => {
    clearTimeout(timers.get(key));
    timers.set(key, setTimeout(() => { timers.delete(key); fn(); }, ms));
  };
}

// Replaces `el` with the fragment the server renders at `url` (removes it on 404). A failure
// leaves the element as it is: the next event, or the resync after a reconnect, fetches again.
async function replaceWith(el, url) {
  try {
    const resp = await get(url);
    if (resp.status === 404) { el?.remove(); return null; }
    if (!resp.ok) return null;
    const tpl = document.createElement("template");
    tpl.innerHTML = (await resp.text()).trim();
    const fresh = tpl.content.firstElementChild;
    if (el && fresh) el.replaceWith(fresh);
    return fresh;
  } catch (_) {
    return null;
  }
}

// The overview follows the event stream: a Service's row, or a section, is fetched again from
// the server when an event names it. The stream reconnects after a drop.
function liveOverview() {
  const later = debouncer(250);
  const sectionOf = { Node: "nodes", Ingress: "ingresses", Backup: "backups" };
  const services = () => document.getElementById("services");
  const onEvent = (e) => {
    if (e.kind === "Service") {
      later(`svc/${e.name}`, async () => {
        const id = `svc-${e.name}`;
        let row = document.getElementById(id);
        // A Service not on this page appears here only on an unfiltered first page with room.
        const body = document.getElementById("services-body");
        const table = services();
        const room = table.dataset.page === "1" && table.dataset.filtered === "false"
          && body.childElementCount < Number(table.dataset.pageSize);
        if (!row && !room) return;
        if (!row) {
          row = document.createElement("tr");
          row.id = id;
          body.appendChild(row);
        }
        await replaceWith(row, `${PATHS.pathRow}${encodeURIComponent(e.name)}`);
      });
      later("summary", () => replaceWith(document.getElementById("services-summary"), `${PATHS.pathSection}summary`));
    }
    for (const section of [sectionOf[e.kind], "events"]) {
      const el = section && document.querySelector(`[data-section="${section}"]`);
      if (el) later(section, () => replaceWith(document.querySelector(`[data-section="${section}"]`), `${PATHS.pathSection}${section}`));
    }
  };
  // Level-based, like berth's controllers: after the stream was down, whatever changed in the
  // meantime is read again whole (the page's table and every section), not replayed.
  const resync = () => {
    replaceWith(services(), `${PATHS.pathSection}services${location.search}`);
    for (const el of document.querySelectorAll("[data-section]")) {
      replaceWith(el, `${PATHS.pathSection}${el.dataset.section}`);
    }
  };
  let opened = false;
  const connect = async () => {
    const status = await lines(`${PATHS.pathEvents}?watch=true`, onEvent, undefined, () => {
      if (opened) resync();
      opened = true;
      document.body.dataset.live = "connected";
    }).catch(() => 0);
    document.body.dataset.live = "disconnected";
    // A token that may not watch (403) is not retried.
    if (status !== 403 && status !== 401) setTimeout(connect, 2000);
  };
  connect();
}

function servicePage(root) {
  const api_ = root.dataset.api;
  const tasksBody = document.getElementById("tasks-body");
  const cell = (text) => { const td = document.createElement("td"); td.textContent = text ?? ""; return td; };
  const loadTasks = async () => {
    const r = await api("GET", `${api_}/tasks`).catch(() => null);
    if (!r?.ok || !tasksBody) return;
    tasksBody.replaceChildren(...(r.json.items || []).map((t) => {
      const tr = document.createElement("tr");
      tr.append(cell(`${t.name}.${(t.id || "").slice(0, 12)}`), cell(t.node), cell(t.desiredState), cell(t.state), cell(t.since), cell(t.image), cell(t.error));
      return tr;
    }));
  };
  loadTasks();
  setInterval(loadTasks, 5000);

  // Logs: the last 200 lines of every task, then followed while the box is ticked.
  const logs = document.getElementById("logs");
  const follow = document.getElementById("follow");
  let ctl = null;
  const loadLogs = () => {
    ctl?.abort();
    ctl = new AbortController();
    logs.textContent = "";
    const f = follow.checked ? "true" : "false";
    const mine = ctl;
    lines(`${api_}/logs?tail=200&follow=${f}`, (l) => {
      const line = document.createElement("div");
      line.className = l.stream;
      line.textContent = `${l.task} | ${l.line}`;
      logs.appendChild(line);
      while (logs.childElementCount > 2000) logs.firstElementChild.remove();
      logs.scrollTop = logs.scrollHeight;
    }, ctl.signal).catch(() => {
      // The stream broke (not stopped by us): read the tail again in a moment.
      if (!mine.signal.aborted) setTimeout(() => { if (ctl === mine) loadLogs(); }, 2000);
    });
  };
  follow?.addEventListener("change", loadLogs);
  if (logs) loadLogs();

  // Undo: the patch the server prepared for the revision (conditional on the version shown).
  const result = document.getElementById("undo-result");
  for (const b of document.querySelectorAll("button.undo")) {
    b.addEventListener("click", async () => {
      b.disabled = true;
      // Not retried: the patch is conditional on the version the page showed, so a second try
      // after one that went through would only meet a conflict.
      const r = await api("PATCH", api_, b.dataset.patch, "application/merge-patch+json")
        .catch((e) => ({ ok: false, status: 0, json: { message: `${e}; reload to see whether it applied` } }));
      result.textContent = r.ok
        ? `rolled back to revision ${b.dataset.revision}; reload to see the new revision`
        : `refused (${r.status}): ${r.json?.message ?? r.text}`;
      result.className = r.ok ? "ok" : "error";
      b.disabled = false;
    });
  }

  const form = document.getElementById("terminal-form");
  form?.addEventListener("submit", (ev) => { ev.preventDefault(); openTerminal(root); });
}

// Exec frames (api-types workload.rs): a type byte, a 4-byte big-endian length, the payload.
const FRAME = { stdin: 0x00, stdinEof: 0x01, resize: 0x02, stdout: 0x10, stderr: 0x11, exit: 0x12, error: 0x13 };
function frame(tag, payload) {
  const out = new Uint8Array(5 + payload.length);
  out[0] = tag;
  new DataView(out.buffer).setUint32(1, payload.length);
  out.set(payload, 5);
  return out;
}

let terminal = null;
function openTerminal(root) {
  const box = document.getElementById("terminal");
  terminal?.dispose();
  box.replaceChildren();
  const term = new window.Terminal({ cursorBlink: true, convertEol: false, fontSize: 13 });
  const fit = new window.FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(box);
  fit.fit();
  terminal = term;
  const command = document.getElementById("terminal-command").value.trim().split(/\s+/).filter(Boolean);
  const task = document.getElementById("terminal-task").value.trim();
  const request = { command: command.length ? command : ["sh"], stdin: true, tty: true, size: [term.cols, term.rows] };
  if (task) request.task = task;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const q = new URLSearchParams({ request: JSON.stringify(request), [PATHS.csrfParam]: CSRF });
  const ws = new WebSocket(`${scheme}://${location.host}${root.dataset.exec}?${q}`, ["berth-exec.v1"]);
  ws.binaryType = "arraybuffer";
  const enc = new TextEncoder();
  const dec = new TextDecoder();
  box.dataset.state = "connecting";
  ws.onopen = () => { box.dataset.state = "open"; term.focus(); };
  ws.onmessage = (m) => {
    const b = new Uint8Array(m.data);
    const tag = b[0];
    const payload = b.subarray(5);
    if (tag === FRAME.stdout || tag === FRAME.stderr) term.write(payload);
    else if (tag === FRAME.exit) {
      term.write(`\r\n[exited with code ${new DataView(payload.buffer, payload.byteOffset).getInt32(0)}]\r\n`);
      box.dataset.state = "exited";
    } else if (tag === FRAME.error) {
      term.write(`\r\n[error: ${dec.decode(payload)}]\r\n`);
      box.dataset.state = "error";
    }
  };
  ws.onclose = (e) => {
    if (box.dataset.state === "connecting") {
      term.write("\r\n[the server refused the terminal: see the role of your token]\r\n");
      box.dataset.state = "refused";
    } else if (box.dataset.state === "open") {
      box.dataset.state = "closed";
    }
  };
  term.onData((d) => { if (ws.readyState === 1) ws.send(frame(FRAME.stdin, enc.encode(d))); });
  term.onResize(({ cols, rows }) => {
    const p = new Uint8Array(4);
    new DataView(p.buffer).setUint16(0, cols);
    new DataView(p.buffer).setUint16(2, rows);
    if (ws.readyState === 1) ws.send(frame(FRAME.resize, p));
  });
  window.addEventListener("resize", () => fit.fit());
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.querySelector('[data-live="overview"]')) liveOverview();
  const svc = document.querySelector("[data-service]");
  if (svc) servicePage(svc);
});

window.berth = { api };
