// Drive ComfyUI's own front end in headless Chromium: load UI workflows like a user's file drop, report what
// the app made of them, and queue them through the app.
//
//   node drive.js URL [--shots DIR] [--run-shots DIR] [--dialog-shots DIR] [--no-queue]
//                     [--set [NODE_TYPE.]WIDGET=NUMBER ...] WORKFLOW.json ...
//
// --set: before queueing, give every widget of that name (on nodes of that type, or on any node) that value,
// as a user would; the tests make the example workflows small and short this way so they run in seconds.
// --shots: a screenshot of each graph as loaded; --run-shots: of each graph after its run, with what the nodes
// show (previews, texts); --dialog-shots: of the page with the dialogs that opened on load.
//
// Prints one JSON line per workflow (driveOne's report, or `error`). Exits non-zero only when the browser or the page
// itself cannot be driven; everything about a workflow is data for the caller (tests/ui/test_frontend.py).
const { chromium } = require('playwright-core');
const fs = require('fs');
const path = require('path');

const VIEWPORT = { width: 1600, height: 900 };
const HISTORY_TIMEOUT_MS = 120000;

function parseArgs(argv) {
  const args = { url: null, shots: null, runShots: null, dialogShots: null, queue: true, edits: {}, workflows: [] };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--shots') args.shots = argv[++i];
    else if (argv[i] === '--run-shots') args.runShots = argv[++i];
    else if (argv[i] === '--dialog-shots') args.dialogShots = argv[++i];
    else if (argv[i] === '--set') { const [key, value] = argv[++i].split('='); args.edits[key] = Number(value); }
    else if (argv[i] === '--no-queue') args.queue = false;
    else if (!args.url) args.url = argv[i].replace(/\/$/, '');
    else args.workflows.push(argv[i]);
  }
  if (!args.url || !args.workflows.length) throw new Error('usage: node drive.js URL [--shots DIR] [--run-shots DIR] [--dialog-shots DIR] [--no-queue] [--set [NODE_TYPE.]WIDGET=NUMBER ...] WORKFLOW.json ...');
  return args;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// The canvas follows the window through a resize observer; wait for it, or a fit-to-view computed meanwhile
// (the front end does one when a workflow opens) would use the old size.
async function resizeWindow(page, size) {
  await page.setViewportSize(size);
  await page.waitForFunction((w) => window.app.canvas.canvas.clientWidth === w, size.width, { timeout: 10000 });
  await sleep(200);
}

// Text of the dialogs on screen (the missing-nodes warning is one; none is expected after a clean load).
async function openDialogs(page) {
  return page.evaluate(() => [...document.querySelectorAll('.p-dialog, [role="dialog"]')]
    .filter((d) => d.offsetParent !== null || d.getClientRects().length)
    .map((d) => d.innerText.trim().slice(0, 3000)));
}

// Load exactly as a dropped file: app.handleFile is what the canvas' drop handler and the file picker call.
async function loadLikeADrop(page, file) {
  const text = fs.readFileSync(file, 'utf8');
  return page.evaluate(async ({ text, name }) => {
    const types = JSON.parse(text).nodes.map((n) => n.type);
    // The same registry lookup loadGraphData does before it replaces unknown types with placeholders.
    const missing = [...new Set(types.filter((t) => !(t in window.LiteGraph.registered_node_types)))];
    await window.app.handleFile(new File([text], name, { type: 'application/json' }));
    return { missing_node_types: missing, loaded_types: window.app.graph.nodes.map((n) => n.type) };
  }, { text, name: path.basename(file) });
}

// Layout problems the user would see: a node smaller than the front end's own minimum for its content
// (widgets cut off or drawn over the edge), nodes drawn on top of each other (title bars included), and nodes
// outside the canvas right after opening (the workflow should open with all of it in view).
async function layoutProblems(page) {
  return page.evaluate(() => {
    const nodes = window.app.graph.nodes;
    const undersized = nodes.filter((n) => { const [w, h] = n.computeSize(); return n.size[0] + 0.5 < w || n.size[1] + 0.5 < h; })
      .map((n) => ({ id: n.id, type: n.type, size: [...n.size], min: [...n.computeSize()] }));
    const overlaps = [];
    for (let i = 0; i < nodes.length; i++) {
      for (let j = i + 1; j < nodes.length; j++) {
        const [ax, ay, aw, ah] = nodes[i].boundingRect, [bx, by, bw, bh] = nodes[j].boundingRect;
        if (ax < bx + bw && bx < ax + aw && ay < by + bh && by < ay + ah) overlaps.push([nodes[i].id, nodes[j].id]);
      }
    }
    const ds = window.app.canvas.ds, el = window.app.canvas.canvas;
    const offscreen = nodes.filter((n) => {
      const [x, y, w, h] = n.boundingRect;
      const [sx0, sy0] = ds.convertOffsetToCanvas([x, y]), [sx1, sy1] = ds.convertOffsetToCanvas([x + w, y + h]);
      return sx0 < 0 || sy0 < 0 || sx1 > el.clientWidth || sy1 > el.clientHeight;
    }).map((n) => n.id);
    return { undersized, overlaps, offscreen };
  });
}

// Screenshot the whole graph at zoom 1 (below ~0.6 LiteGraph stops drawing text), in a viewport grown to fit it,
// placed away from the app's edge overlays (menu, side bar, run button, minimap), clipped to the graph.
async function screenshotGraph(page, out) {
  const pad = 32, margin = { left: 120, top: 260, right: 320, bottom: 60 };
  const box = await page.evaluate(() => {
    const rects = window.app.graph.nodes.map((n) => n.boundingRect);
    const x0 = Math.min(...rects.map((r) => r[0])), y0 = Math.min(...rects.map((r) => r[1]));
    const x1 = Math.max(...rects.map((r) => r[0] + r[2])), y1 = Math.max(...rects.map((r) => r[1] + r[3]));
    return { x0, y0, w: x1 - x0, h: y1 - y0 };
  });
  await resizeWindow(page, { width: Math.ceil(box.w + margin.left + margin.right), height: Math.ceil(box.h + margin.top + margin.bottom) });
  await page.evaluate(({ box, margin }) => {
    const ds = window.app.canvas.ds;
    window.app.canvas.show_info = false; // the stats text in the canvas' corner
    ds.scale = 1;
    ds.offset = [margin.left - box.x0, margin.top - box.y0];
    window.app.canvas.setDirty(true, true);
  }, { box, margin });
  // Image previews (LoadImage) arrive over HTTP; DOM widgets (text boxes) follow the canvas on the next frames.
  await page.waitForFunction(() => window.app.graph.nodes.every((n) => !n.imgs || n.imgs.every((i) => i.complete)), null, { timeout: 10000 }).catch(() => {});
  await sleep(500);
  await page.screenshot({ path: out, clip: { x: margin.left - pad, y: margin.top - pad, width: Math.ceil(box.w) + 2 * pad, height: Math.ceil(box.h) + 2 * pad } });
  await page.evaluate(() => { window.app.canvas.show_info = true; });
  await resizeWindow(page, VIEWPORT);
}

async function setWidgets(page, edits) {
  return page.evaluate((edits) => {
    const done = [];
    for (const node of window.app.graph.nodes) {
      for (const w of node.widgets ?? []) {
        const key = `${node.type}.${w.name}` in edits ? `${node.type}.${w.name}` : w.name;
        if (key in edits) {
          w.value = edits[key];
          w.callback?.(w.value, window.app.canvas, node); // as a user's edit does: extensions may listen
          done.push([String(node.id), w.name, w.value]);
        }
      }
    }
    window.app.graph.setDirtyCanvas(true, true);
    return done;
  }, edits);
}

async function waitForHistory(url, promptId) {
  const deadline = Date.now() + HISTORY_TIMEOUT_MS;
  while (Date.now() < deadline) {
    const entry = (await (await fetch(`${url}/history/${promptId}`)).json())[promptId];
    const status = entry?.status?.status_str;
    if (status === 'success' || status === 'error') return entry;
    await sleep(250);
  }
  return null;
}

// Queue through the app (the Run button's call) and read the prompt it actually posted and the server's answer.
async function queueThroughApp(page, url) {
  const posted = page.waitForResponse((r) => r.request().method() === 'POST' && new URL(r.url()).pathname.endsWith('/prompt'), { timeout: 30000 });
  await page.evaluate(() => window.app.queuePrompt(0, 1));
  const response = await posted;
  const queued = response.request().postDataJSON().prompt;
  const answer = await response.json().catch(() => null);
  if (response.status() !== 200 || !answer?.prompt_id) return { queued, http_status: response.status(), answer, history: null };
  const entry = await waitForHistory(url, answer.prompt_id);
  const history = entry && {
    status: entry.status.status_str,
    messages: entry.status.messages.filter(([kind]) => kind === 'execution_error'),
    images: Object.values(entry.outputs ?? {}).flatMap((o) => o.images ?? []),
    outputs: entry.outputs ?? {},
    // nodes ComfyUI did not run because an earlier prompt computed the same: it sends no outputs for them
    cached: entry.status.messages.filter(([kind]) => kind === 'execution_cached').flatMap(([, data]) => data.nodes),
  };
  return { queued, http_status: response.status(), prompt_id: answer.prompt_id, history };
}

// What the nodes show after a run, once the front end has it from the server: the size of each image a node
// displays (previews arrive as /view requests after the 'executed' message) and the values of its widgets.
async function displayedOutputs(page, outputs) {
  const expected = Object.fromEntries(Object.entries(outputs).map(([id, o]) => [id, (o.images ?? []).length]));
  await page.waitForFunction((expected) => Object.entries(expected).every(([id, n]) => {
    const node = window.app.graph.getNodeById(Number(id));
    return !node || (node.imgs?.length ?? 0) >= n && (node.imgs ?? []).every((i) => i.complete);
  }), expected, { timeout: 20000 }).catch(() => {});
  await sleep(300);
  return page.evaluate(() => Object.fromEntries(window.app.graph.nodes.map((n) => [String(n.id), {
    type: n.type,
    images: (n.imgs ?? []).map((i) => [i.naturalWidth, i.naturalHeight]),
    // the text each string widget draws (a disabled widget keeps its value but draws none)
    widgets: Object.fromEntries((n.widgets ?? []).filter((w) => typeof w.value === 'string').map((w) => [w.name, w._displayValue ?? w.value])),
  }])));
}

async function driveOne(page, file, args) {
  const result = await loadLikeADrop(page, file);
  await sleep(500); // dialogs and image previews are scheduled after the load returns
  result.dialogs = await openDialogs(page);
  if (result.dialogs.length && args.dialogShots) {
    await sleep(1000); // the dialog's contents (e.g. the missing models' sizes) load after it opens
    result.dialog_screenshot = path.join(args.dialogShots, path.basename(file, '.json') + '_dialog.png');
    await page.screenshot({ path: result.dialog_screenshot });
  }
  if (result.dialogs.length) await page.keyboard.press('Escape');
  result.layout = await layoutProblems(page);
  result.prompt = (await page.evaluate(() => window.app.graphToPrompt())).output;
  if (args.shots) {
    result.screenshot = path.join(args.shots, path.basename(file, '.json') + '.png');
    await screenshotGraph(page, result.screenshot);
  }
  if (args.queue) {
    result.widget_edits = await setWidgets(page, args.edits);
    Object.assign(result, await queueThroughApp(page, args.url));
    if (result.history) {
      result.displayed = await displayedOutputs(page, result.history.outputs);
      if (args.runShots) {
        result.run_screenshot = path.join(args.runShots, path.basename(file, '.json') + '_run.png');
        await screenshotGraph(page, result.run_screenshot);
      }
    }
  }
  return result;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium', headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
  });
  try {
    const page = await browser.newPage({ viewport: VIEWPORT });
    // Uncaught exceptions in the page fail a test; console errors do not (the front end logs harmless 404s etc.).
    let pageErrors = [], consoleErrors = [];
    page.on('pageerror', (e) => pageErrors.push(String(e.stack || e).slice(0, 1000)));
    page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text().slice(0, 300)); });
    await page.goto(args.url, { waitUntil: 'load', timeout: 60000 });
    await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types && document.querySelector('canvas'), null, { timeout: 60000 });

    for (const file of args.workflows) {
      const t0 = Date.now();
      const result = { workflow: file };
      try {
        Object.assign(result, await driveOne(page, file, args));
      } catch (e) { // reported with this workflow; the next one still runs
        result.error = String(e.stack || e).slice(0, 2000);
      }
      Object.assign(result, { page_errors: pageErrors, console_errors: consoleErrors, seconds: (Date.now() - t0) / 1000 });
      pageErrors = []; consoleErrors = [];
      console.log(JSON.stringify(result));
    }
  } finally {
    await browser.close();
  }
}

main().catch((e) => { console.error(e); process.exit(1); });
