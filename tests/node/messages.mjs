// Reads a session with the browser helper (static/sse-gateway.js) in Node, the `eventsource`
// package standing in for the browser's EventSource, which reconnects by itself with
// Last-Event-ID when a connection drops. The helper assembles the session's messages.
// Each time the helper's cursor is one of a replay that holds messages back (ID/HOLD:EPOCH), up to
// CUTS times, the script drops the connection itself (stream.reconnect), so the helper resumes
// from that cursor as it stored it (?last_event_id=). A line "pause" on stdin closes the stream
// (the helper keeps its cursor), "resume" opens it again from there.
// Usage: node messages.mjs STREAM_URL [TIMEOUT_MS] [CUTS]
// Prints {"messages", "plain", "merged", "held", "cut", "reconnects", "duplicates", "cursor", "result"}
// at gateway.end; "merged" has the count of each message.append that stood for several deltas.
import { createInterface } from "node:readline";
import { EventSource } from "eventsource";

globalThis.EventSource = EventSource;
await import("../../static/sse-gateway.js");

const url = process.argv[2];
const maxCuts = Number(process.argv[4] || 3);
const plain = [];
const merged = [];
const held = []; // ID/HOLD cursors seen
const cut = []; // the cursors the script dropped the connection at

function cutHere(stream) {
  if (!stream.cursor.includes("/")) return;
  held.push(stream.cursor);
  if (cut.length < maxCuts) {
    cut.push(stream.cursor);
    stream.reconnect(0);
  }
}

const stream = SSEGateway.connect(url, {
  events: ["note", "message.append"],
  retryMs: 50,
  onEvent: (e, s) => {
    if (e.type !== "message.append") plain.push([e.type, e.json]);
    else if (e.json.count) merged.push(e.json.count);
    cutHere(s);
  },
  onMessage: (_, stream) => {
    if (stream.state !== "ended") cutHere(stream);
  },
  onEnd: (end, stream) => {
    process.stdout.write(JSON.stringify({ messages: stream.messages, plain, merged, held, cut,
      reconnects: stream.reconnects, duplicates: stream.duplicates, cursor: stream.cursor,
      result: end.result }) + "\n");
    process.exit(0);
  },
  onError: (err) => {
    process.stdout.write(JSON.stringify({ error: err }) + "\n");
    process.exit(1);
  },
});
createInterface({ input: process.stdin }).on("line", (line) => {
  if (line === "pause") stream.reconnect(2147483647); // closed now; reopened by "resume"
  if (line === "resume") stream.reconnect(0);
});
setTimeout(() => {
  process.stdout.write(JSON.stringify({ timeout: true, plain: plain.length }) + "\n");
  process.exit(1);
}, Number(process.argv[3] || 60000));
