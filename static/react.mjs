// useGatewaySession: a React hook over the sse-gateway helper. React is a peer dependency.
//
//   import { useGatewaySession } from "sse-gateway-client/react";
//   const { view, status, outcome, error } = useGatewaySession({
//     url: `/v1/sessions/${id}/stream`,
//     events: ["token"],
//     initial: { text: "" },
//     reduce: (view, e) => ({ text: view.text + e.json.text }),   // return a new object: React compares by identity
//     persist: true,                                              // optional: keep the view across reloads
//   });
//
// Without `reduce`, `view` is the list of events received: [{id, type, cursor, data}] (data parsed as JSON
// when it is JSON). `outcome` is how the run ended, {status, result, error}, once it did (`result` stays
// gateway.end's data). The stream opens when the component mounts (or `url` changes) and closes when it unmounts.
// `messages` holds the session's messages (message.*), assembled: [{id, type, metadata, text, status, error}].
// `send(kind, data)`, `cancel(reason)` and `approve(approvalId, decision)` post input for the agent (a token
// with the "input" scope); `approvals` holds the approvals the agent asked for (decision null while open).
import { useCallback, useEffect, useRef, useState } from "react";
import { connect } from "./sse-gateway.mjs";

/** The default reducer: appends each event, its data parsed when it is JSON. */
export function appendEvent(list, e) {
  const json = e.json;
  return [...(list || []), { id: e.id, type: e.type, cursor: e.cursor, data: json === undefined ? e.data : json }];
}

function firstView(options) {
  if (!options.reduce) return [];
  const initial = options.initial;
  return typeof initial === "function" ? initial() : initial === undefined ? null : initial;
}

export function useGatewaySession(options) {
  const opts = options || {};
  const url = opts.url || null;
  const latest = useRef(opts);
  latest.current = opts;
  const persistKey = opts.persist ? (opts.persist === true ? "default" : opts.persist.key || "default") : "";
  const [snap, setSnap] = useState(() => ({
    view: firstView(opts), status: url ? "connecting" : "idle", result: undefined, outcome: undefined, ended: false,
    error: null, cursor: null, stream: null, approvals: {}, messages: [],
  }));
  const streamRef = useRef(null);
  const noStream = () => {
    const error = new Error("the session has no stream yet");
    error.code = "no_stream";
    error.status = 0;
    return Promise.reject(error);
  };
  const send = useCallback((kind, data, o) => (streamRef.current ? streamRef.current.send(kind, data, o) : noStream()), []);
  const cancel = useCallback((reason, o) => (streamRef.current ? streamRef.current.cancel(reason, o) : noStream()), []);
  const approve = useCallback(
    (id, decision, data, o) => (streamRef.current ? streamRef.current.approve(id, decision, data, o) : noStream()), []);

  useEffect(() => {
    if (!url) {
      streamRef.current = null;
      setSnap((s) => ({ ...s, status: "idle", stream: null }));
      return undefined;
    }
    const o = latest.current;
    const forward = (name) => (arg, stream) => {
      const fn = latest.current[name];
      if (fn) fn(arg, stream);
    };
    const stream = connect(url, {
      ...o,
      reduce: (view, e) => (latest.current.reduce || appendEvent)(view, e),
      initial: o.reduce ? o.initial : () => [],
      getToken: o.getToken ? (s) => latest.current.getToken(s) : undefined,
      onEvent: forward("onEvent"),
      onGap: forward("onGap"),
      onAck: forward("onAck"),
      onApprovalRequest: (request, s) => {
        setSnap((p) => ({ ...p, approvals: { ...s.approvals } }));
        forward("onApprovalRequest")(request, s);
      },
      onInput: (input, s) => {
        setSnap((p) => ({ ...p, approvals: { ...s.approvals } }));
        forward("onInput")(input, s);
      },
      onMessage: (message, s) => {
        setSnap((p) => ({ ...p, messages: s.messages, cursor: s.cursor }));
        forward("onMessage")(message, s);
      },
      onReset: (reset, s) => {
        setSnap((p) => ({ ...p, messages: s.messages }));
        forward("onReset")(reset, s);
      },
      onView: (view, s) => {
        setSnap((p) => ({ ...p, view, cursor: s.cursor }));
        forward("onView")(view, s);
      },
      onState: (status, s) => {
        setSnap((p) => ({ ...p, status, cursor: s.cursor }));
        forward("onState")(status, s);
      },
      onEnd: (end, s) => {
        setSnap((p) => ({ ...p, result: end.result, outcome: end.outcome, ended: true, cursor: s.cursor }));
        forward("onEnd")(end, s);
      },
      onError: (error, s) => {
        setSnap((p) => ({ ...p, error }));
        forward("onError")(error, s);
      },
    });
    streamRef.current = stream;
    setSnap({ view: stream.view, status: stream.state, result: stream.result, outcome: stream.outcome,
      ended: stream.state === "ended", error: null, cursor: stream.cursor, stream,
      approvals: { ...stream.approvals }, messages: stream.messages });
    return () => {
      if (streamRef.current === stream) streamRef.current = null;
      stream.close();
    };
  }, [url, persistKey]);

  return { ...snap, send, cancel, approve };
}

export default useGatewaySession;
