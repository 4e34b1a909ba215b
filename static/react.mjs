// useGatewaySession: a React hook over the sse-gateway helper. React is a peer dependency.
//
//   import { useGatewaySession } from "sse-gateway-client/react";
//   const { view, status, result, error } = useGatewaySession({
//     url: `/v1/sessions/${id}/stream`,
//     events: ["token"],
//     initial: { text: "" },
//     reduce: (view, e) => ({ text: view.text + e.json.text }),   // return a new object: React compares by identity
//     persist: true,                                              // optional: keep the view across reloads
//   });
//
// Without `reduce`, `view` is the list of events received: [{id, type, cursor, data}] (data parsed as JSON
// when it is JSON). The stream opens when the component mounts (or `url` changes) and closes when it unmounts.
import { useEffect, useRef, useState } from "react";
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
    view: firstView(opts), status: url ? "connecting" : "idle", result: undefined, ended: false, error: null,
    cursor: null, stream: null,
  }));

  useEffect(() => {
    if (!url) {
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
      onReset: forward("onReset"),
      onAck: forward("onAck"),
      onView: (view, s) => {
        setSnap((p) => ({ ...p, view, cursor: s.cursor }));
        forward("onView")(view, s);
      },
      onState: (status, s) => {
        setSnap((p) => ({ ...p, status, cursor: s.cursor }));
        forward("onState")(status, s);
      },
      onEnd: (end, s) => {
        setSnap((p) => ({ ...p, result: end.result, ended: true, cursor: s.cursor }));
        forward("onEnd")(end, s);
      },
      onError: (error, s) => {
        setSnap((p) => ({ ...p, error }));
        forward("onError")(error, s);
      },
    });
    setSnap({ view: stream.view, status: stream.state, result: stream.result, ended: stream.state === "ended",
      error: null, cursor: stream.cursor, stream });
    return () => stream.close();
  }, [url, persistKey]);

  return snap;
}

export default useGatewaySession;
