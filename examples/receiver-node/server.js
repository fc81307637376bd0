// A receiver for check365-worker webhooks, with Node's http module and the
// `standardwebhooks` package.
//
//     npm install
//     WEBHOOK_SECRET=whsec_... PORT=8000 node server.js
//
// It does the four things every receiver must:
//
// 1. verify the signature over the raw body, byte for byte, before parsing anything;
// 2. ignore a webhook-id it has already handled (delivery is at-least-once);
// 3. reassemble a big job's parts, which may arrive in any order;
// 4. answer 2xx quickly once the event is safely handled (here 204), and 5xx if it
//    could not be handled, so that the worker retries it later.
//
// State lives in memory to keep the example short. In production keep it in your
// database: insert the webhook-id into a table with a unique key in the same
// transaction as the event's effects, so that a crash between the two cannot lose
// or double an event, and several receiver processes share what was seen.

"use strict";

const crypto = require("node:crypto");
const http = require("node:http");
const { Webhook, WebhookVerificationError } = require("standardwebhooks");

const PATH = "/webhooks/check365";
// A part carries at most WEBHOOK_MAX_RESULTS_PER_PART results (1000 by default,
// about 250 KB); this is ample, and bounds what a stranger can make us read.
const MAX_BODY = 16 * 1024 * 1024;

// WEBHOOK_SECRET, checked at start-up: a wrong one would answer 400 to every webhook.
// The value itself is never printed: it is a secret, even when malformed.
function loadSecret() {
  const secret = (process.env.WEBHOOK_SECRET ?? "").trim();
  let problem = null;
  if (!secret) {
    problem = "is not set: use your endpoint's secret (whsec_...)";
  } else if (!/^whsec_[A-Za-z0-9+/]+={0,2}$/.test(secret) || (secret.length - 6) % 4 !== 0) {
    problem = "must be one secret of the form whsec_<base64 key>, as the worker has it";
  }
  if (problem !== null) {
    console.error(`WEBHOOK_SECRET ${problem}`);
    process.exit(2);
  }
  return secret;
}
const SECRET = loadSecret();
const webhook = new Webhook(SECRET);

// What `check365-worker endpoints` shows for this secret: compare the two, never the secret itself.
function fingerprint(secret) {
  const key = Buffer.from(secret.slice("whsec_".length), "base64");
  return `sha256:${crypto.createHash("sha256").update(key).digest("hex").slice(0, 16)}`;
}

// The reference library's reasons, as the answer's error (anything else is a bad signature).
const REFUSALS = {
  "Missing required headers": "missing webhook headers",
  "Message timestamp too old": "stale timestamp (check this host's clock)",
  "Message timestamp too new": "timestamp in the future (check this host's clock)",
};

const seen = new Set(); // handled webhook-ids: use a table with a unique key in production
const accepted = []; // what GET /events shows
const parts = new Map(); // jobId -> Map(part.index -> results)
const jobs = {}; // jobId -> its outcome, once known

// Apply one verified event; true when it finished its job.
function handle(event) {
  const data = event.data;
  const jobId = data.jobId;
  if (event.type === "bulk_validation.completed") {
    if (!parts.has(jobId)) parts.set(jobId, new Map());
    const jobParts = parts.get(jobId);
    jobParts.set(data.part.index, data.results);
    if (jobParts.size < data.part.count) return false;
    const results = [...jobParts.keys()].sort((a, b) => a - b).flatMap((index) => jobParts.get(index));
    parts.delete(jobId);
    // Your code takes over here: `results` is every result of the job, in
    // Check365's order, and data.metadata is what was given at enqueue.
    jobs[jobId] = { type: event.type, results: results.length, emails: results.map((r) => r.email) };
    return true;
  }
  // bulk_validation.failed (see data.reason) or bulk_validation.timed_out (data.status,
  // data.progress): the job will never deliver results through this watch.
  jobs[jobId] = { type: event.type, reason: data.reason ?? null };
  return true;
}

function send(res, status, body) {
  if (body === undefined) {
    res.writeHead(status).end();
    return;
  }
  const text = JSON.stringify(body);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(text) });
  res.end(text);
}

function receive(req, res, body) {
  let event;
  try {
    // The raw bytes: re-serialised JSON would not match the signature.
    event = webhook.verify(body, req.headers);
  } catch (err) {
    // A bad signature, a stale timestamp, missing headers (WebhookVerificationError),
    // or a signed body that is not JSON: nothing unverified goes any further.
    const error =
      err instanceof WebhookVerificationError ? (REFUSALS[err.message] ?? "invalid signature") : "invalid body";
    send(res, 400, { error });
    return;
  }
  const webhookId = req.headers["webhook-id"];
  if (seen.has(webhookId)) {
    send(res, 204); // a retry of an event already handled: acknowledge, do nothing
    return;
  }
  let finished;
  try {
    finished = handle(event);
  } catch (err) {
    // Unexpected content: let the worker retry rather than lose the event.
    console.error(`could not handle ${webhookId}:`, err);
    send(res, 500, { error: err.name });
    return;
  }
  seen.add(webhookId);
  const record = {
    webhookId,
    type: event.type,
    jobId: event.data.jobId,
    part: event.data.part ?? null,
    results: (event.data.results ?? []).length,
    jobFinished: finished,
  };
  accepted.push(record);
  console.log(JSON.stringify(record));
  send(res, 204);
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://receiver");
  if (req.method === "GET" && url.pathname === "/events") {
    // A window for demos and tests; remove it (or protect it) in production.
    send(res, 200, { accepted, jobs });
    return;
  }
  if (req.method !== "POST" || url.pathname !== PATH) {
    send(res, 404, { error: "not found" });
    return;
  }
  const chunks = [];
  let size = 0;
  req.on("data", (chunk) => {
    size += chunk.length;
    if (size > MAX_BODY) {
      send(res, 413, { error: "body too large" });
      req.destroy();
      return;
    }
    chunks.push(chunk);
  });
  req.on("end", () => {
    if (size <= MAX_BODY) receive(req, res, Buffer.concat(chunks));
  });
});

const port = Number.parseInt(process.env.PORT ?? "8000", 10);
// Loopback by default; set HOST=0.0.0.0 in a container.
const host = process.env.HOST ?? "127.0.0.1";
server.listen(port, host, () => {
  console.error(JSON.stringify({ listening: `http://${host}:${port}${PATH}`, secret: fingerprint(SECRET) }));
});

// Stop cleanly on Ctrl-C and on `docker stop`.
for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeIdleConnections(); // keep-alive connections would hold close() open
    setTimeout(() => process.exit(0), 5000).unref();
  });
}
