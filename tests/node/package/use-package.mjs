// Runs inside a scratch project where the packed sse-gateway-client tarball was installed with
// `npm install <tarball>`: imports the package by its name (ESM, require(), the script build and
// the React hook), and reads a run on a real gateway through it. Node has no EventSource, so the
// `eventsource` package (a spec-following one) stands in for the browser's.
// Usage: node use-package.mjs GATEWAY_URL   → prints one JSON line of findings.
import { createRequire } from "node:module";
import { EventSource } from "eventsource";
import SSEGateway, { connect, outcomeOf, GatewayStream, GatewayEvent } from "sse-gateway-client";
import { useGatewaySession, appendEvent } from "sse-gateway-client/react";
import React from "react";
import TestRenderer from "react-test-renderer";

globalThis.EventSource = EventSource;
const require = createRequire(import.meta.url);
const base = process.argv[2];
const out = {};
const timer = setTimeout(() => finish({ timeout: true }), 60000);

function finish(extra) {
  clearTimeout(timer);
  process.stdout.write(JSON.stringify({ ...out, ...extra }) + "\n");
  process.exit(0);
}

async function call(method, path, body) {
  const res = await fetch(base + path, { method, headers: { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body) });
  if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${await res.text()}`);
  return res.status === 204 ? null : res.json();
}

async function publishRun(id, words) {
  await call("POST", "/v1/sessions", { id });
  await call("POST", `/v1/sessions/${id}/events`, words.map((w) => ({ event: "token", data: { t: w } })));
  await call("POST", `/v1/sessions/${id}/complete`, { result: { text: words.join("") } });
}

// What the package exports, by each way of loading it.
const cjs = require("sse-gateway-client");
out.esm = typeof connect === "function" && SSEGateway.connect === connect && typeof GatewayStream === "function"
  && typeof GatewayEvent === "function" && SSEGateway.outcomeOf === outcomeOf;
out.cjs = typeof cjs.connect === "function" && typeof cjs.GatewayStream === "function"
  && typeof cjs.outcomeOf === "function";
await import("sse-gateway-client/script");
out.script = typeof globalThis.SSEGateway.connect === "function";
out.react = typeof useGatewaySession === "function" && typeof appendEvent === "function";
out.version = require("sse-gateway-client/package.json").version;

// The helper, reducing a finished run to its text, with the result and the ack.
const words = Array.from({ length: 50 }, (_, i) => `w${i + 1} `);
await publishRun("pkg", words);
const helper = await new Promise((resolve) => {
  connect(`${base}/v1/sessions/pkg/stream`, {
    events: ["token"],
    initial: { text: "" },
    reduce: (view, e) => ({ text: view.text + e.json.t }),
    onAck: (cursor, stream) => resolve({ text: stream.view.text, result: stream.result, acked: cursor,
      cursor: stream.cursor, state: stream.state, outcome: stream.outcome }),
    onError: (err) => resolve({ error: err }),
  });
});
out.helper = helper;

// The return path: the helper answers an approval request, steers and cancels; every input comes
// back once as gateway.input (onInput), a second answer is refused with the gateway's code.
await call("POST", "/v1/sessions", { id: "inp" });
out.input = await new Promise((resolve) => {
  const found = { inputs: [], requests: [], answers: [] };
  const stream = connect(`${base}/v1/sessions/inp/stream`, {
    events: ["gateway.input"],
    initial: [],
    reduce: (view, e) => [...view, `${e.type}:${e.json.kind}`],
    onApprovalRequest: async (request, s) => {
      found.requests.push(request.approvalId);
      found.answers.push((await s.approve(request.approvalId, "approve", undefined, { idempotencyKey: "a1" })).id);
      try {
        await s.approve(request.approvalId, "deny");
      } catch (err) {
        found.second = { code: err.code, status: err.status, inputId: err.body && err.body.input_id };
      }
      found.answers.push((await s.send("steer", { text: "shorter" })).id);
      found.answers.push((await s.cancel("enough")).id);
      found.cancelling = (await s.fetchSession()).run_status;
      await call("POST", "/v1/sessions/inp/complete", { status: "cancelled",
        error: { code: "cancelled", message: "enough" }, result: { text: "partial" } });
    },
    onInput: (input) => found.inputs.push([input.inputId, input.kind, input.decision || null]),
    onEnd: async (end, s) => {
      try {
        await s.send("message", "late");
      } catch (err) {
        found.late = err.code;
      }
      resolve({ ...found, view: s.view, approvals: s.approvals, result: end.result, outcome: end.outcome,
        streamOutcome: s.outcome, runStatus: (await s.fetchSession()).run_status });
    },
    onError: (err) => resolve({ error: err }),
  });
  stream.send("shout").catch((err) => (found.badKind = err.code));
  call("POST", "/v1/sessions/inp/events", { event: "approval.request", data: { approval_id: "rm-1", cmd: "rm" } });
});

// How runs end: the outcome from gateway.end's data, and from the session (exact) after a 204. A
// completed run whose result looks like another outcome is the documented ambiguity of the data.
async function endOf(id, cursor) {
  return new Promise((resolve) => {
    const url = `${base}/v1/sessions/${id}/stream` + (cursor ? `?last_event_id=${cursor}` : "");
    const stream = connect(url, {
      onEnd: async (end, s) => resolve({ outcome: end.outcome, fromSession: !!end.fromSession,
        stream: s.outcome, runStatus: (await s.fetchSession()).run_status }),
      onError: (err) => resolve({ error: err.code }),
    });
    void stream;
  });
}
const ends = {};
for (const [id, body] of [
  ["end-ok", { result: { text: "hi" } }],
  ["end-none", {}],
  ["end-failed", { status: "failed", error: { code: "tool_failed", message: "boom" } }],
  ["end-lookalike", { result: { status: "failed", error: "not really" } }],
]) {
  await call("POST", `/v1/sessions/${id}/events`, { data: 1 });
  await call("POST", `/v1/sessions/${id}/complete`, body);
  const session = await call("GET", `/v1/sessions/${id}`);
  ends[id] = { replay: await endOf(id), after204: await endOf(id, `${session.last_id}:${session.epoch}`) };
}
out.ends = ends;
out.outcomeOf = [outcomeOf({ status: "timed_out", error: { code: "lease_expired" } }), outcomeOf([1]),
  outcomeOf({ status: "failed" }, "completed"), outcomeOf(null)];
const missing = connect(`${base}/v1/sessions/nobody/stream`, { onError: () => {} });
out.missing = await missing.fetchSession().then(() => null, (err) => ({ code: err.code, status: err.status }));
missing.close();

// The React hook, rendered with react-test-renderer until the run has ended.
await publishRun("hook", words.slice(0, 20));
const seen = [];
function Run() {
  const session = useGatewaySession({ url: `${base}/v1/sessions/hook/stream`, events: ["token"] });
  seen.push({ status: session.status, count: session.view.length, ended: session.ended,
    outcome: session.outcome ? session.outcome.status : null });
  return React.createElement("p", null, session.ended ? JSON.stringify(session.result) : session.status);
}
const renderer = TestRenderer.create(React.createElement(Run));
const hook = await new Promise((resolve) => {
  const check = setInterval(() => {
    const last = seen[seen.length - 1];
    if (last && last.ended) {
      clearInterval(check);
      resolve({ last, rendered: renderer.toJSON().children.join("") });
    }
  }, 10);
});
renderer.unmount();
out.hook = { ...hook, statuses: [...new Set(seen.map((s) => s.status))] };
finish({});
