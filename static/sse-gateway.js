/*
 * sse-gateway.js: EventSource for sse-gateway streams, with a view that survives page reloads.
 *
 *   <script src="/static/sse-gateway.js"></script>      defines window.SSEGateway
 *   import { connect } from "/static/sse-gateway.mjs";  the same, as an ES module
 *   npm install ./sse-gateway-client-X.Y.Z.tgz          the same, as a package (see docs/javascript.md)
 *
 *   const stream = SSEGateway.connect("/v1/sessions/run1/stream", {
 *     events: ["token"],                                  // event types besides "message"
 *     initial: { text: "" },
 *     reduce: (view, e) => ({ text: view.text + e.json.text }),   // the page's view of the run
 *     onView: (view) => render(view.text),                // after a (re)load and after each event
 *     onEnd: (end) => done(end.outcome),                  // how the run ended: {status, result, error}
 *     onError: (err) => fail(err.code),                   // unauthorized, forbidden, not_found, cors, unreachable
 *     onApprovalRequest: (req) => ask(req.approvalId, req.data),   // the agent asks (approval.request)
 *     onInput: (input) => note(input.kind, input.decision),       // a user's input, mirrored (gateway.input)
 *     onMessage: (msg) => show(msg.id, msg.text, msg.status),     // a message (message.*) changed
 *   });
 *   stream.send("steer", { text: "shorter" });          // input for the agent: a Promise of the gateway's answer
 *   stream.approve("rm-1", "approve");                  // answers an approval request
 *   stream.cancel("enough");                            // asks the agent to stop
 *
 * The reload model:
 *  - by default nothing is stored: every page load reads the session's log from its first event
 *    (the log is durable), so a reloaded page rebuilds its whole view; within one page life, a
 *    dropped connection resumes exactly after the last event received (the cursor, ID:EPOCH);
 *  - with `persist`, the reduced view and the cursor are stored together (sessionStorage by
 *    default), so a reload restores the view and resumes right after the stored cursor; a run that
 *    had ended is restored with its result and not streamed again.
 * Either way each event is applied once, and gateway.reset (a new life of the session) starts the
 * view over.
 * Messages: an agent that publishes an answer as a message (message.start, .append, .reset, .end,
 * .replace; a replay sends message.snapshot, the whole message at once) gets it assembled here:
 * `stream.messages` holds one object per message, {id, type, metadata, text, status, error, start},
 * in the order they began (start: the log id of message.start), status open, finished or failed; each change makes a new object
 * and calls onMessage(msg). They are persisted with the view and restored with it. Cursors are
 * opaque strings (ID:EPOCH, or ID/HOLD:EPOCH while a replay holds messages back): the helper only
 * stores them and hands them back, it never reads a number out of one to decide anything. At the end the helper reports how the run ended, {status, result, error} with status
 * completed, failed, cancelled or timed_out (end.outcome, stream.outcome; stream.fetchSession()
 * has the session's exact run_status), and acknowledges the end event (POST .../ack); when the
 * gateway answers 204 (the cursor is already at the end) it fetches the session for the result
 * and the outcome. Failures that retrying cannot fix are reported once through onError with a
 * code instead of reconnecting forever; a 401 first asks options.getToken() for a fresh
 * subscribe token; coming back online retries at once.
 * The return path: send/cancel/approve POST to the session's /input with the stream's token (one
 * minted with the "input" scope) or cookies, each with an idempotency key (one per call, sent
 * again on each retry: network failures, 429 and 5xx are retried for up to giveUpMs, and while
 * the browser is offline the retry waits for it to be online), and reject with {code, status,
 * message} where `code` is the gateway's (approval_answered, insufficient_scope,
 * session_completed, ...). Every tab sees each input once, as a gateway.input event: onInput, and
 * `reduce` too when "gateway.input" is in `events`.
 * approval.request events open `stream.approvals[approvalId]` until an input answers them.
 * Heartbeats (": ping" comments) keep proxies from closing a quiet stream; EventSource never
 * surfaces them, so `lastEventAt` only moves on events.
 */
(function (root) {
  "use strict";

  const CONTROL = ["gateway.gap", "gateway.reset", "gateway.end"];
  const FATAL = { 400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "refused",
    406: "refused", 410: "not_found", 415: "refused" };
  const MESSAGES = {
    unauthorized: "the gateway refused the credentials (401) and no new token could be had",
    forbidden: "the credentials do not allow reading this session (403)",
    not_found: "there is no such session (404): it was deleted, expired or never existed",
    bad_request: "the gateway refused the request as malformed (400)",
    refused: "the gateway refused the request",
    cors: "the gateway answered but the browser may not read it: the page's origin is not allowed (--cors-origin)",
    unreachable: "the gateway could not be reached for too long",
  };
  const RECORD_VERSION = 1;
  const INPUT_KINDS = ["message", "steer", "approval", "cancel"];
  const END_STATUSES = ["failed", "cancelled", "timed_out"]; // a gateway.end whose data says one of these
  const RUN_ENDS = ["completed", ...END_STATUSES];
  const SURFACED = ["gateway.input", "approval.request"]; // always received; given to reduce only if in `events`
  const MESSAGE_OPS = ["message.start", "message.append", "message.reset", "message.end", "message.replace",
    "message.snapshot"]; // always received and assembled into `messages`; given to reduce only if in `events`
  const MESSAGE_STATUSES = ["open", "finished", "failed"];
  const pageKeys = { prefix: "js-" + Math.random().toString(36).slice(2, 10) + Date.now().toString(36), n: 0 };

  /** A fresh idempotency key: one per user action, so a retried request is one input. */
  function nextKey() {
    pageKeys.n += 1;
    return pageKeys.prefix + "-" + pageKeys.n;
  }

  /** Wait `ms`, or less: the browser coming back online ends the wait at once. */
  function pause(ms) {
    return new Promise((resolve) => {
      const listens = typeof root.addEventListener === "function";
      const done = () => {
        clearTimeout(timer);
        if (listens) root.removeEventListener("online", done);
        resolve();
      };
      const timer = setTimeout(done, Math.min(ms, 2147483647));
      if (listens) root.addEventListener("online", done);
    });
  }

  /** true when the browser says it has no network (navigator.onLine); elsewhere never. */
  function offline() {
    return !!(root.navigator && root.navigator.onLine === false);
  }

  /**
   * How a run ended, from its gateway.end data: {status, result, error}.
   * Data that is an object whose `status` is failed, cancelled or timed_out is such an end
   * ({status, error, result?}); anything else is the result of a completed run (v1). Given the
   * session's `run_status` (`status`), that decides instead: it is exact, the data is not when a
   * completed run's result is itself an object with such a status.
   */
  function outcomeOf(data, status) {
    const ended = data !== null && typeof data === "object" && !Array.isArray(data);
    const kind = RUN_ENDS.includes(status) ? status
      : ended && END_STATUSES.includes(data.status) ? data.status : "completed";
    if (kind === "completed") return { status: kind, result: data === undefined ? null : data, error: null };
    const body = ended ? data : {};
    return { status: kind, result: body.result === undefined ? null : body.result,
      error: body.error === undefined ? null : body.error };
  }

  function defaultStorage() {
    try {
      return root.sessionStorage || null;
    } catch (_) {
      return null; // storage disabled (privacy settings, sandboxed frame)
    }
  }

  /** The log id a cursor starts with (ID:EPOCH, ID/HOLD:EPOCH), for display only: cursors are
   * opaque, and nothing the helper decides reads a number out of one. */
  function idOf(cursor) {
    const m = /^([0-9]+)(?=[/:]|$)/.exec(cursor || "");
    return m ? Number(m[1]) : 0;
  }

  /** A message as the page sees it (a fresh object for each change). */
  function newMessage(id, fields) {
    const m = { id, type: null, metadata: null, text: "", status: "open", error: null, start: null, ...fields };
    if (!MESSAGE_STATUSES.includes(m.status)) m.status = "finished";
    if (m.type === undefined) m.type = null;
    if (m.metadata === undefined) m.metadata = null;
    if (m.error === undefined) m.error = null;
    return m;
  }

  /** One entry of the log: {type, id, cursor, data}; `json` parses the data. */
  class GatewayEvent {
    constructor(message) {
      this.type = message.type;
      this.cursor = message.lastEventId;
      /** The log id at the head of the cursor, for display; replayed message snapshots may share one. */
      this.id = idOf(message.lastEventId);
      this.data = message.data;
    }

    /** The data parsed as JSON, or undefined for a text event that is not JSON. */
    get json() {
      try {
        return JSON.parse(this.data);
      } catch (_) {
        return undefined;
      }
    }

    /** For gateway.end: its data, the run's final result (null if it was completed without one;
     * for a run that did not complete, {status, error, result?}: see `outcome`). */
    get result() {
      return this.type === "gateway.end" ? this.json : undefined;
    }

    /** For gateway.end: how the run ended, {status, result, error} (`outcomeOf`). */
    get outcome() {
      return this.type === "gateway.end" ? outcomeOf(this.json, this.runStatus) : undefined;
    }
  }

  class GatewayStream {
    constructor(url, options) {
      const o = (this.options = options || {});
      this.url = new URL(url, root.location && root.location.href);
      const given = this.url.searchParams.get("last_event_id"); // a start point, unless a view is restored
      this.url.searchParams.delete("last_event_id");
      this.sessionUrl = o.sessionUrl ? new URL(o.sessionUrl, this.url) : sessionUrlOf(this.url);
      this.types = ["message", ...(o.events || [])].filter((t) => !CONTROL.includes(t));
      this._reduced = new Set(this.types); // the types `reduce` sees; the surfaced ones are heard anyway
      for (const t of [...SURFACED, ...MESSAGE_OPS]) if (!this.types.includes(t)) this.types.push(t);
      this.retryMs = o.retryMs || 1000;
      this.maxRetryMs = o.maxRetryMs || 30000;
      this.giveUpMs = o.giveUpMs === undefined ? 60000 : o.giveUpMs;
      this.maxAttempts = o.maxAttempts === undefined ? Infinity : o.maxAttempts;
      const persist = o.persist === true ? {} : o.persist || null;
      this._reduce = o.reduce || (persist && persist.reduce) || null;
      this._initial = "initial" in o ? o.initial : persist && "initial" in persist ? persist.initial : null;
      if (persist && !this._reduce && !o.onMessage) {
        // What is stored is what the page shows: a view that `reduce` builds, or the messages.
        throw new TypeError("SSEGateway: persist needs a reduce(view, event) function (or onMessage)");
      }
      this.storage = persist ? (persist.storage === undefined ? defaultStorage() : persist.storage) : null;
      this.storageKey = persist ? persist.key || "sse-gateway:view:" + this.url.pathname : null;
      this._saveMs = persist && persist.saveMs !== undefined ? persist.saveMs : 100;

      /** The page's view of the run, as `reduce` builds it (null without reduce). */
      this.view = this._freshView();
      /** The cursor of the last event received (ID:EPOCH, or ID/HOLD:EPOCH), or null before the first
       * one: an opaque string, stored and sent back as it came. */
      this.cursor = given || null;
      /** The session's messages, in the order they began: {id, type, metadata, text, status,
       * error} (a new array and a new object for each change). */
      this.messages = [];
      this._messageAt = new Map(); // message id -> index in `messages`
      /** gateway.end's data: the run's result, once it ended (undefined before). */
      this.result = undefined;
      /** How the run ended, {status, result, error}, once it ended (undefined before). */
      this.outcome = undefined;
      /** {code, status, message} of the failure that stopped the stream, or null. */
      this.error = null;
      /** The cursor the gateway confirmed as acknowledged, or null. */
      this.acked = null;
      /** connecting | open | reconnecting | ended | closed | failed */
      this.state = "connecting";
      /** true when the view and cursor were restored from storage. */
      this.restored = false;
      this.reconnects = 0;
      this.gaps = 0;
      this.resets = 0;
      this.duplicates = 0;
      this.lastEventAt = null;
      /** Approvals the agent asked for: {approvalId: {approvalId, data, cursor, decision, inputId}};
       * `decision` is null while the approval is open. */
      this.approvals = {};
      this._end = null;
      this._source = null;
      this._opened = 0;
      this._attempts = 0;
      this._downSince = null;
      this._refreshes = 0;
      this._timer = null;
      this._watchdog = null;
      this._saveTimer = null;
      this._flush = () => this._write();
      this._listening = false;
      this._online = () => {
        // Back online: a stream waiting out its backoff tries again now.
        if (this.state === "reconnecting" && this._timer) this._schedule(0);
      };

      const record = this._load();
      if (record) {
        this.restored = true;
        this.view = record.view;
        this.cursor = record.cursor;
        if (record.end) {
          this._end = new GatewayEvent({ type: "gateway.end", lastEventId: record.end.cursor,
            data: record.end.data });
          if (record.end.status) this._end.runStatus = record.end.status;
        }
        if (record.acked) this.acked = record.acked;
        if (record.approvals) this.approvals = record.approvals;
        if (Array.isArray(record.messages)) this._setMessages(record.messages);
      }
      if (this.storage && root.addEventListener) root.addEventListener("pagehide", this._flush);

      if (this._end) {
        // The run had ended before the reload: its view and result are all there is; nothing to stream.
        this.result = this._end.json;
        this.outcome = this._end.outcome;
        this.state = "ended";
        this._later(() => {
          this._showMessages();
          this._showView();
          this._call("onState", "ended");
          this._call("onEnd", this._end);
          if (this.acked !== this._end.cursor) this._ack(this._end.cursor);
        });
        return;
      }
      if (this._reduce || this.messages.length) {
        this._later(() => {
          this._showMessages();
          if (this._reduce) this._showView();
        });
      }
      this._open();
    }

    /** Stop for good; a persisted view and cursor are kept, so a later connect() resumes after them. */
    close() {
      this._write();
      if (this.storage && root.removeEventListener) root.removeEventListener("pagehide", this._flush);
      this._stop("closed");
    }

    /** Drop the connection now and open a new one after `delayMs`, resuming from the cursor; also
     * starts again after a failure. */
    reconnect(delayMs) {
      if (this.state === "ended" || this.state === "closed") return;
      if (this.state === "failed") {
        this.error = null;
        this._attempts = 0;
        this._downSince = null;
        this._refreshes = 0;
      }
      this._detach();
      this._schedule(delayMs || 0);
    }

    // -- the return path (user -> agent) ------------------------------------------

    /** Send the agent input: kind "message", "steer", "approval" or "cancel". Resolves with the
     * gateway's answer {id, session, kind, event_id, input_last_id, epoch}; rejects with
     * {code, status, message, body} (`code` the gateway's, or "unreachable", "no_session_url"). */
    send(kind, data, options) {
      const o = options || {};
      if (!INPUT_KINDS.includes(kind)) {
        return Promise.reject(this._inputError("invalid_kind", 0, "kind is one of " + INPUT_KINDS.join(", ")));
      }
      const body = { kind, idempotency_key: o.idempotencyKey || nextKey() };
      if (data !== undefined && data !== null) body.data = data;
      if (o.approvalId !== undefined) body.approval_id = o.approvalId;
      if (o.decision !== undefined) body.decision = o.decision;
      return this._sendInput(body);
    }

    /** Ask the agent to stop: a "cancel" input, with {reason} when one is given. */
    cancel(reason, options) {
      return this.send("cancel", reason === undefined || reason === null ? null : { reason }, options);
    }

    /** Answer an approval request: decision "approve" (default) or "deny". */
    approve(approvalId, decision, data, options) {
      return this.send("approval", data, { ...(options || {}), approvalId, decision: decision || "approve" });
    }

    async _sendInput(body) {
      if (!this.sessionUrl) throw this._inputError("no_session_url", 0, "no session URL to send input to");
      let refreshed = false;
      const started = Date.now();
      for (let attempt = 0; ; attempt++) {
        let res = null;
        try {
          res = await this._request("POST", "/input", body);
        } catch (_) {
          res = null; // the network, or CORS: the same key makes a retry safe
        }
        if (res && res.ok) return res.json();
        if (res && res.status === 401 && this.options.getToken && !refreshed) {
          refreshed = true;
          try {
            this.url.searchParams.set(this.options.tokenParam || "token", await this.options.getToken(this));
            continue;
          } catch (_) {
            // no new token: the 401 is the answer
          }
        }
        // A lost answer is not a lost input: the gateway may have stored it. Retrying with the same
        // key is the only way to know, so the retries go on (within giveUpMs) rather than give up
        // and let the user press again, which would send a second input.
        const retryable = !res || res.status === 429 || res.status >= 500;
        const left = this.giveUpMs - (Date.now() - started);
        if (!retryable || !(left > 0)) {
          if (!res) throw this._inputError("unreachable", 0, "the gateway could not be reached");
          throw await this._refusal(res, "the gateway refused the input");
        }
        const retryAfter = res ? Number(res.headers.get("retry-after")) || 0 : 0;
        const backoff = Math.min(this.maxRetryMs, this.retryMs * 2 ** Math.min(attempt, 30))
          * (0.5 + Math.random() / 2);
        // Offline: nothing can get through before the browser is online again, which ends the pause.
        await pause(offline() ? left : Math.min(left, Math.max(retryAfter * 1000, backoff)));
      }
    }

    /** The session as the gateway has it now (GET /v1/sessions/{id}, with the stream's token or
     * cookies): {status, run_status, outcome, result, error, last_id, ...}. Its run_status is the
     * exact outcome of an ended run. Rejects like send(). */
    async fetchSession() {
      if (!this.sessionUrl) throw this._inputError("no_session_url", 0, "no session URL to ask");
      let refreshed = false;
      for (;;) {
        let res;
        try {
          res = await this._request("GET");
        } catch (_) {
          throw this._inputError("unreachable", 0, "the gateway could not be reached");
        }
        if (res.ok) return res.json();
        if (res.status === 401 && this.options.getToken && !refreshed) {
          refreshed = true;
          try {
            this.url.searchParams.set(this.options.tokenParam || "token", await this.options.getToken(this));
            continue;
          } catch (_) {
            // no new token: the 401 is the answer
          }
        }
        throw await this._refusal(res, "the gateway refused to show the session");
      }
    }

    /** An error for a refused request, with the gateway's code and body when it sent them. */
    async _refusal(res, message) {
      let answer = null;
      try {
        answer = await res.json();
      } catch (_) {
        answer = null;
      }
      const error = answer && answer.error;
      return this._inputError(error && error.code ? error.code : "http_" + res.status, res.status,
        (error && error.message) || message, answer);
    }

    _inputError(code, status, message, body) {
      const error = new Error(message);
      error.code = code;
      error.status = status;
      if (body !== undefined) error.body = body;
      return error;
    }

    /** gateway.input and approval.request: surfaced, and tracked in `approvals`. */
    _surface(event) {
      const data = event.json;
      if (!data || typeof data !== "object") return;
      if (event.type === "approval.request" && typeof data.approval_id === "string") {
        const known = this.approvals[data.approval_id];
        if (known) return; // asked again: an answered approval is not reopened
        this.approvals[data.approval_id] = { approvalId: data.approval_id, data, cursor: event.cursor,
          decision: null, inputId: null };
        this._call("onApprovalRequest", { approvalId: data.approval_id, data, event });
      } else if (event.type === "gateway.input") {
        const input = { inputId: data.input_id, kind: data.kind, data: data.data === undefined ? null : data.data,
          event };
        if (data.approval_id !== undefined) {
          input.approvalId = data.approval_id;
          input.decision = data.decision;
          const open = this.approvals[data.approval_id];
          if (open) {
            open.decision = data.decision;
            open.inputId = data.input_id;
          }
        }
        this._call("onInput", input);
      }
    }

    /** The message with this id, or undefined. */
    message(id) {
      const at = this._messageAt.get(id);
      return at === undefined ? undefined : this.messages[at];
    }

    /** Fold a message operation (or a replay's snapshot) into `messages`: the message it changed, or
     * null. A message op the helper cannot place (malformed, or after its message was closed) is
     * skipped and counted in `duplicates`: the gateway never sends one. */
    _fold(event) {
      const data = event.json;
      if (!data || typeof data !== "object" || typeof data.message !== "string") return null;
      const id = data.message;
      const known = this.message(id);
      const op = event.type;
      let next;
      if (op === "message.snapshot") {
        if (known) this.duplicates++; // a message is sent whole once; its snapshot is still the truth
        next = newMessage(id, { type: data.type, metadata: data.metadata,
          text: typeof data.text === "string" ? data.text : "", status: data.status, error: data.error,
          start: typeof data.start === "number" ? data.start : null });
      } else if (op === "message.start") {
        if (known) {
          this.duplicates++;
          return null;
        }
        next = newMessage(id, { type: data.type, metadata: data.metadata, start: event.id });
      } else {
        // A message begun before a start point given in the URL has no start here: it is shown from
        // what arrives, marked partial.
        const m = known || newMessage(id, { partial: true });
        if (m.status !== "open" && op !== "message.replace") {
          this.duplicates++;
          return null;
        }
        next = { ...m };
        if (op === "message.append") {
          next.text = m.text + (typeof data.text === "string" ? data.text : "");
        } else if (op === "message.reset") {
          next.text = "";
        } else {
          if (op === "message.replace") {
            next.text = typeof data.text === "string" ? data.text : "";
            if ("metadata" in data) next.metadata = data.metadata;
            delete next.partial; // the whole text
          }
          next.status = data.status === "failed" ? "failed" : "finished";
          next.error = data.error === undefined ? null : data.error;
        }
      }
      const at = this._messageAt.get(id);
      if (at === undefined) {
        // In the order the messages began (a replay sends a message whole when it closes, so parallel
        // messages may arrive in another order than they began)
        let to = this.messages.length;
        while (to > 0 && next.start != null && this.messages[to - 1].start != null && this.messages[to - 1].start > next.start) to--;
        this._setMessages([...this.messages.slice(0, to), next, ...this.messages.slice(to)]);
      } else {
        const list = this.messages.slice();
        list[at] = next;
        this.messages = list;
      }
      return next;
    }

    _setMessages(list) {
      this.messages = list.filter((m) => m && typeof m.id === "string");
      this._messageAt = new Map(this.messages.map((m, i) => [m.id, i]));
    }

    _showMessages() {
      for (const m of this.messages) this._call("onMessage", m);
    }

    /** Forget the persisted view and cursor (the stream itself goes on). */
    forget() {
      clearTimeout(this._saveTimer);
      this._saveTimer = null;
      try {
        if (this.storage) this.storage.removeItem(this.storageKey);
      } catch (_) {
        // storage disabled: nothing was stored
      }
    }

    // -- connection ----------------------------------------------------------

    _streamUrl() {
      const u = new URL(this.url);
      if (this.cursor) u.searchParams.set("last_event_id", this.cursor);
      return u;
    }

    _open() {
      this._timer = null;
      this._listen(true);
      this._arm();
      const source = new EventSource(this._streamUrl(), { withCredentials: !!this.options.withCredentials });
      this._source = source;
      this._setState(this._opened ? "reconnecting" : "connecting");
      source.onopen = () => {
        if (source !== this._source) return;
        if (this._opened++) this.reconnects++;
        clearTimeout(this._watchdog);
        this._watchdog = null;
        this._attempts = 0;
        this._downSince = null;
        this._refreshes = 0;
        this._setState("open");
      };
      source.onerror = () => {
        if (source !== this._source) return;
        if (source.readyState === EventSource.CONNECTING && this.state === "open") {
          // An open stream dropped: the browser reconnects by itself, sending Last-Event-ID.
          this._attempt();
          this._setState("reconnecting");
        } else {
          // Refused, or the browser's own reconnect failed too (network, CORS): find out why, and
          // back off from here on, within giveUpMs and maxAttempts.
          this._detach();
          this._diagnose();
        }
      };
      const onMessage = (m) => source === this._source && this._onMessage(m);
      for (const type of [...this.types, ...CONTROL]) source.addEventListener(type, onMessage);
    }

    _onMessage(message) {
      const type = message.type;
      if (type === "gateway.gap" || type === "gateway.reset") {
        const info = JSON.parse(message.data); // notices carry no id: the cursor stays
        if (type === "gateway.gap") {
          this.gaps++;
          this._call("onGap", info);
        } else {
          this.resets++; // another life of the session: the old cursor, view and messages mean nothing now
          this.cursor = null;
          this.view = this._freshView();
          this._setMessages([]);
          this.approvals = {};
          this._save(true);
          this._call("onReset", info);
          if (this._reduce) this._showView();
        }
        return;
      }
      const event = new GatewayEvent(message);
      // The gateway sends each event once, each with its own cursor; cursors are compared only for
      // equality (their order is the gateway's business). Applying one twice would corrupt the view.
      if (message.lastEventId && message.lastEventId === this.cursor) {
        this.duplicates++; // never expected from the gateway
        return;
      }
      this.cursor = message.lastEventId;
      this.lastEventAt = Date.now();
      if (type === "gateway.end") {
        this._ended(event);
        return;
      }
      const changed = MESSAGE_OPS.includes(type) ? this._fold(event) : null;
      const reduced = this._reduce && this._reduced.has(type);
      if (reduced) this.view = this._reduce(this.view, event);
      if (SURFACED.includes(type)) this._surface(event);
      this._save(false);
      if (changed) this._call("onMessage", changed);
      if (this._reduced.has(type)) this._call("onEvent", event);
      if (reduced) this._showView();
    }

    _ended(event) {
      this._end = event;
      this.result = event.json;
      this.outcome = event.outcome;
      this.cursor = event.cursor;
      this._save(true);
      this._stop("ended");
      this._call("onEnd", event);
      this._ack(event.cursor);
    }

    /** EventSource hides the status of a refused connection: ask the gateway, then decide. */
    async _diagnose() {
      this._setState("reconnecting");
      const probe = await this._probe();
      if (this._source || this._timer || this.state !== "reconnecting") return; // closed or reopened meanwhile
      const status = probe.status;
      if (status === 204) return this._endFromSession();
      if (status === 401) return this._refreshOrFail(status);
      if (FATAL[status]) return this._fail(FATAL[status], status);
      if (probe.cors) return this._fail("cors", 0);
      this._retry(status, probe.retryAfter);
    }

    /** A retryable failure (network, 429, 5xx): back off, unless the attempts are exhausted. */
    _retry(status, retryAfterS) {
      this._attempt();
      if (this._exhausted()) return this._fail("unreachable", status);
      const n = Math.min(this._attempts, 30);
      const backoff = Math.min(this.maxRetryMs, this.retryMs * 2 ** (n - 1)) * (0.5 + Math.random() / 2);
      this._schedule(Math.max(backoff, (retryAfterS || 0) * 1000));
    }

    _attempt() {
      this._attempts++;
      if (this._downSince === null) this._downSince = Date.now();
      this._arm();
    }

    /** However the attempts go (a connection may also hang), no connection for giveUpMs is a failure. */
    _arm() {
      if (this._watchdog || !(this.giveUpMs <= 2147483647)) return; // Infinity: never give up
      this._watchdog = setTimeout(() => {
        this._watchdog = null;
        if (this.state === "connecting" || this.state === "reconnecting") this._fail("unreachable", 0);
      }, this.giveUpMs);
    }

    _exhausted() {
      if (this._attempts >= this.maxAttempts) return true;
      return this._downSince !== null && Date.now() - this._downSince >= this.giveUpMs;
    }

    async _refreshOrFail(status) {
      if (!this.options.getToken || this._refreshes >= 2) return this._fail("unauthorized", status);
      this._refreshes++; // twice without a successful open in between: the new tokens are refused too
      try {
        const token = await this.options.getToken(this);
        if (!token) throw new Error("getToken() returned no token");
        this.url.searchParams.set(this.options.tokenParam || "token", token);
      } catch (err) {
        return this._fail("unauthorized", status, err);
      }
      if (this.state === "reconnecting" && !this._timer && !this._source) this._schedule(0);
    }

    async _probe() {
      const u = this._streamUrl();
      u.searchParams.set("live", "false");
      const abort = new AbortController();
      const init = { signal: abort.signal, cache: "no-store", credentials: this._credentials() };
      try {
        const res = await fetch(u, init);
        return { status: res.status, retryAfter: Number(res.headers.get("retry-after")) || 0 };
      } catch (_) {
        // A network failure, or an answer the browser may not read (CORS). An opaque request
        // goes through in the second case only.
        try {
          await fetch(u, { ...init, mode: "no-cors" });
          return { status: 0, cors: root.location && u.origin !== root.location.origin };
        } catch (_) {
          return { status: 0 };
        }
      } finally {
        abort.abort(); // only the status was wanted, never the body
      }
    }

    /** 204: the session is completed and the cursor is at its end. Its result is in the session. */
    async _endFromSession() {
      if (!this.sessionUrl) {
        // No session URL to ask: the run has ended, its result is unknown here.
        const end = new GatewayEvent({ type: "gateway.end", lastEventId: this.cursor || "0", data: "null" });
        end.fromSession = true;
        return this._ended(end);
      }
      let res = null;
      try {
        res = await this._request("GET");
      } catch (_) {
        res = null;
      }
      if (this.state !== "reconnecting" || this._source || this._timer) return;
      if (res && res.status === 200) {
        const session = await res.json();
        if (session.status === "completed") {
          // The end event as the gateway wrote it: the result of a completed run, else {status, error,
          // result?}; and the session's run_status, which says exactly how the run ended.
          const status = RUN_ENDS.includes(session.run_status) ? session.run_status : undefined;
          const result = session.result === undefined ? null : session.result;
          const data = !status || status === "completed" ? result
            : { status, error: session.error === undefined ? null : session.error,
              ...(result === null ? {} : { result }) };
          const end = new GatewayEvent({ type: "gateway.end", lastEventId: `${session.last_id}:${session.epoch}`,
            data: JSON.stringify(data) });
          end.fromSession = true;
          if (status) end.runStatus = status;
          return this._ended(end);
        }
        return this._retry(200); // rarely: deleted and created again as the stream started
      }
      if (!res) return this._retry(0);
      if (res.status === 401) return this._refreshOrFail(401);
      if (FATAL[res.status]) return this._fail(FATAL[res.status], res.status);
      this._retry(res.status);
    }

    /** Acknowledge delivery up to `cursor`, so the session's acked_id reaches its last id. */
    async _ack(cursor) {
      if (this.options.ack === false || !this.sessionUrl) return;
      for (let tries = 0; tries < 2; tries++) {
        let res;
        try {
          res = await this._request("POST", "/ack", { id: cursor });
        } catch (_) {
          return; // best effort: the gateway still knows the run ended
        }
        if (res.ok) {
          this.acked = cursor;
          this._save(true);
          this._call("onAck", cursor);
          return;
        }
        if (res.status !== 401 || !this.options.getToken) return;
        try {
          this.url.searchParams.set(this.options.tokenParam || "token", await this.options.getToken(this));
        } catch (_) {
          return;
        }
      }
    }

    /** A JSON request to the session (GET) or one of its sub-resources, with the stream's credentials. */
    _request(method, path, body) {
      const u = new URL(this.sessionUrl);
      if (path) u.pathname += path;
      const headers = {};
      const token = this.url.searchParams.get(this.options.tokenParam || "token");
      if (token) headers.authorization = "Bearer " + token;
      const init = { method, headers, cache: "no-store", credentials: this._credentials() };
      if (body !== undefined) {
        headers["content-type"] = "application/json";
        init.body = JSON.stringify(body);
      }
      return fetch(u, init);
    }

    _credentials() {
      return this.options.withCredentials ? "include" : "same-origin";
    }

    _fail(code, status, error) {
      this.error = { code, status, message: MESSAGES[code] || code };
      if (error) this.error.error = error;
      this._stop("failed");
      this._call("onError", this.error);
    }

    _schedule(delayMs) {
      clearTimeout(this._timer);
      this._setState("reconnecting");
      this._timer = setTimeout(() => this._open(), delayMs);
    }

    _detach() {
      if (this._source) {
        this._source.close();
        this._source = null;
      }
    }

    _stop(state) {
      this._listen(false);
      clearTimeout(this._timer);
      clearTimeout(this._watchdog);
      this._timer = null;
      this._watchdog = null;
      this._detach();
      this._setState(state);
    }

    /** Hear the browser coming back online while the stream runs. */
    _listen(on) {
      if (on === this._listening || typeof root.addEventListener !== "function") return;
      this._listening = on;
      if (on) root.addEventListener("online", this._online);
      else root.removeEventListener("online", this._online);
    }

    _setState(state) {
      if (state === this.state) return;
      this.state = state;
      this._call("onState", state);
    }

    _call(name, arg) {
      const fn = this.options[name];
      if (fn) fn.call(this, arg, this);
    }

    _showView() {
      this._call("onView", this.view);
    }

    _later(fn) {
      // Callbacks never run inside connect(), so `const stream = connect(...)` is set when they do.
      Promise.resolve().then(() => {
        if (this.state !== "closed") fn();
      });
    }

    _freshView() {
      const initial = this._initial;
      if (typeof initial === "function") return initial();
      if (initial === null || initial === undefined) return null;
      return JSON.parse(JSON.stringify(initial)); // a copy: reducers may change the view in place
    }

    // -- the persisted view ------------------------------------------------------

    _load() {
      if (!this.storage) return null;
      try {
        const record = JSON.parse(this.storage.getItem(this.storageKey));
        return record && record.v === RECORD_VERSION && "view" in record ? record : null;
      } catch (_) {
        return null;
      }
    }

    /** Store the view and cursor together: at once (`now`), or within saveMs. */
    _save(now) {
      if (!this.storage) return;
      if (now || !this._saveMs) return this._write();
      if (!this._saveTimer) this._saveTimer = setTimeout(this._flush, this._saveMs);
    }

    _write() {
      clearTimeout(this._saveTimer);
      this._saveTimer = null;
      if (!this.storage) return;
      const end = this._end ? { cursor: this._end.cursor, data: this._end.data, status: this._end.runStatus } : null;
      const record = { v: RECORD_VERSION, cursor: this.cursor, view: this.view, end, acked: this.acked,
        approvals: this.approvals, messages: this.messages };
      try {
        this.storage.setItem(this.storageKey, JSON.stringify(record));
      } catch (_) {
        // storage full or disabled: the stream still works, a reload just replays from the start
      }
    }
  }

  /** /v1/sessions/ID/stream → /v1/sessions/ID (null when the stream URL has another shape). */
  function sessionUrlOf(streamUrl) {
    if (!/\/stream\/?$/.test(streamUrl.pathname)) return null;
    const u = new URL(streamUrl);
    u.pathname = u.pathname.replace(/\/stream\/?$/, "");
    u.search = "";
    return u;
  }

  function connect(url, options) {
    return new GatewayStream(url, options);
  }

  const api = { connect, outcomeOf, GatewayStream, GatewayEvent };
  root.SSEGateway = api;
  if (typeof module === "object" && module && module.exports) module.exports = api; // require() in Node
})(globalThis);
