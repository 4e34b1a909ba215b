/*
 * sse-gateway.js: EventSource for sse-gateway streams, with a cursor that survives page reloads.
 *
 *   <script src="/static/sse-gateway.js"></script>      defines window.SSEGateway
 *   import { connect } from "/static/sse-gateway.mjs";  the same, as an ES module
 *
 *   const stream = SSEGateway.connect("/v1/sessions/run1/stream", {
 *     events: ["token"],                       // event types besides "message"
 *     onEvent: (e) => render(e.json),          // e: {type, id, cursor, data, json}
 *     onEnd: (e) => done(e.json),              // gateway.end: the run's final result
 *   });
 *
 * What it adds to EventSource:
 *  - the cursor (ID:EPOCH of the last event received) is kept in sessionStorage and sent as
 *    ?last_event_id= when a new EventSource is opened, so a page reload resumes exactly where it
 *    was (EventSource itself sends Last-Event-ID only on its own reconnects);
 *  - gateway.gap and gateway.reset are reported (a reset also forgets the stored cursor);
 *  - gateway.end closes the stream for good, and so does a 204 (cursor already at the end);
 *  - when the browser gives up (any non-200 answer), it asks the gateway why: on 401 it gets a
 *    fresh subscribe token from options.getToken() and reconnects; on 5xx/429 or a network
 *    failure it reconnects with exponential backoff; on 403/404 it stops.
 * Heartbeats (": ping" comments) keep proxies from closing a quiet stream; EventSource never
 * surfaces them, so `lastEventAt` only moves on events.
 */
(function (root) {
  "use strict";

  const CONTROL = ["gateway.gap", "gateway.reset", "gateway.end"];
  const FATAL = new Set([400, 403, 404, 405, 406, 410, 415]);

  function defaultStorage() {
    try {
      return root.sessionStorage || null;
    } catch (_) {
      return null; // storage disabled (privacy settings, sandboxed frame)
    }
  }

  class GatewayEvent {
    constructor(message) {
      this.type = message.type;
      this.cursor = message.lastEventId;
      this.id = parseInt(message.lastEventId, 10);
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
  }

  class GatewayStream {
    constructor(url, options) {
      this.options = options || {};
      this.url = new URL(url, root.location && root.location.href);
      const given = this.url.searchParams.get("last_event_id"); // a start point, unless one is stored
      this.url.searchParams.delete("last_event_id");
      this.storage = this.options.storage === undefined ? defaultStorage() : this.options.storage;
      this.storageKey = this.options.storageKey || "sse-gateway:cursor:" + this.url.pathname;
      this.types = ["message", ...(this.options.events || [])].filter((t) => !CONTROL.includes(t));
      this.retryMs = this.options.retryMs || 1000;
      this.maxRetryMs = this.options.maxRetryMs || 30000;
      /** ID:EPOCH of the last event received, or null before the first one. */
      this.cursor = this._load() || given;
      /** connecting | open | reconnecting | ended | closed | failed */
      this.state = "connecting";
      this.reconnects = 0;
      this.gaps = 0;
      this.resets = 0;
      this.lastEventAt = null;
      this._source = null;
      this._opened = 0;
      this._failures = 0;
      this._timer = null;
      this._open();
    }

    /** Stop for good; the stored cursor is kept, so a later connect() resumes after it. */
    close() {
      this._stop("closed");
    }

    /** Drop the connection now and open a new one after `delayMs`, resuming from the cursor. */
    reconnect(delayMs) {
      if (this.state === "ended" || this.state === "closed") return;
      this._detach();
      this._schedule(delayMs || 0);
    }

    // -- connection ----------------------------------------------------------

    _streamUrl() {
      const u = new URL(this.url);
      if (this.cursor) u.searchParams.set("last_event_id", this.cursor);
      return u;
    }

    _open() {
      this._timer = null;
      const source = new EventSource(this._streamUrl(), { withCredentials: !!this.options.withCredentials });
      this._source = source;
      this._setState(this._opened ? "reconnecting" : "connecting");
      source.onopen = () => {
        if (source !== this._source) return;
        if (this._opened++) this.reconnects++;
        this._failures = 0;
        this._setState("open");
      };
      source.onerror = () => {
        if (source !== this._source) return;
        if (source.readyState === EventSource.CONNECTING) {
          this._setState("reconnecting"); // the browser retries by itself, sending Last-Event-ID
        } else {
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
          this.resets++; // another life of the session: the old cursor means nothing now
          this.cursor = null;
          this._save();
          this._call("onReset", info);
        }
        return;
      }
      this.cursor = message.lastEventId;
      this.lastEventAt = Date.now();
      this._save();
      const event = new GatewayEvent(message);
      if (type === "gateway.end") {
        this._stop("ended");
        this._call("onEnd", event);
      } else {
        this._call("onEvent", event);
      }
    }

    /** EventSource hides the status of a refused connection: ask the gateway, then decide. */
    async _diagnose() {
      this._setState("reconnecting");
      const status = await this._probe();
      if (this._source || this._timer || this.state === "closed") return; // closed or reopened meanwhile
      if (status === 204) {
        this._stop("ended");
        this._call("onEnd", null);
        return;
      }
      if (status === 401 && this.options.getToken) {
        try {
          this.url.searchParams.set(this.options.tokenParam || "token", await this.options.getToken());
        } catch (err) {
          this._call("onError", { status, error: err });
        }
      } else if (status === 401 || FATAL.has(status)) {
        this._stop("failed");
        this._call("onError", { status });
        return;
      }
      this._failures++;
      const backoff = Math.min(this.maxRetryMs, this.retryMs * 2 ** (this._failures - 1));
      this._schedule(backoff * (0.5 + Math.random() / 2));
    }

    async _probe() {
      const u = this._streamUrl();
      u.searchParams.set("live", "false");
      const abort = new AbortController();
      try {
        const res = await fetch(u, {
          signal: abort.signal,
          cache: "no-store",
          credentials: this.options.withCredentials ? "include" : "same-origin",
        });
        return res.status;
      } catch (_) {
        return 0; // network failure
      } finally {
        abort.abort(); // only the status was wanted, never the body
      }
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
      clearTimeout(this._timer);
      this._timer = null;
      this._detach();
      this._setState(state);
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

    // -- cursor storage --------------------------------------------------------

    _load() {
      try {
        return (this.storage && this.storage.getItem(this.storageKey)) || null;
      } catch (_) {
        return null;
      }
    }

    _save() {
      if (!this.storage) return;
      try {
        if (this.cursor) this.storage.setItem(this.storageKey, this.cursor);
        else this.storage.removeItem(this.storageKey);
      } catch (_) {
        // storage full or disabled: the stream still works, a reload just starts over
      }
    }
  }

  function connect(url, options) {
    return new GatewayStream(url, options);
  }

  root.SSEGateway = { connect, GatewayStream, GatewayEvent };
})(globalThis);
