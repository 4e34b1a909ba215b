// The demo page: start a simulated run, render it through SSEGateway, show what the connection does.
// The run's view is kept in sessionStorage next to the helper's cursor (both written in the same
// event handler), so a reload restores the text and resumes the stream right after it.
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const STORE = "sse-gateway-demo:run";
  const TIMELINE_MAX = 40;
  const origin = location.origin;
  const query = new URLSearchParams(location.search);

  let run = load();
  let stream = null;
  let resumeFrom = null; // the cursor a (re)connection resumed after, until the next event shows it

  // -- state of the run ------------------------------------------------------------

  function fresh(body) {
    return {
      session: body.session, streamUrl: body.stream_url, heartbeat: body.heartbeat,
      text: "", step: "starting", cursor: null, events: 0, lastId: 0, missing: 0, duplicates: 0,
      opens: 0, reconnects: 0, gaps: 0, resets: 0, lastEventAt: null, ended: false, verdict: null,
      toolOpens: 0,
      timeline: [],
    };
  }

  function load() {
    try {
      return JSON.parse(sessionStorage.getItem(STORE));
    } catch (_) {
      return null;
    }
  }

  function save() {
    try {
      sessionStorage.setItem(STORE, JSON.stringify(run));
    } catch (_) {
      // storage disabled: the demo still runs, a reload just loses the view
    }
  }

  function note(text, kind) {
    const when = new Date().toLocaleTimeString([], { hour12: false });
    run.timeline.push({ when, text, kind: kind || "" });
    if (run.timeline.length > TIMELINE_MAX) run.timeline.shift();
  }

  function cursorOf(cursor) {
    return cursor ? cursor : "the start";
  }

  // -- the stream -------------------------------------------------------------------

  function connect() {
    stream = SSEGateway.connect(run.streamUrl, {
      events: ["status", "token", "tool"],
      onState: onState,
      onEvent: onEvent,
      onEnd: onEnd,
      onGap: (gap) => {
        run.gaps++;
        note(`gateway.gap: events ${gap.from}–${gap.to} were trimmed by retention`, "warn");
        save();
        render();
      },
      onReset: (reset) => {
        run.resets++;
        run.text = "";
        run.cursor = null;
        run.lastId = 0;
        note(`gateway.reset: the session restarted (epoch ${reset.epoch}); rendering it from the start`, "warn");
        save();
        render();
      },
      onError: (err) => {
        note(`the gateway refused the stream (HTTP ${err.status}); not retrying`, "bad");
        save();
        render();
      },
    });
  }

  function onState(state, s) {
    if (state === "open") {
      if (run.opens++) {
        run.reconnects++;
        resumeFrom = s.cursor;
        note(`reconnected, resuming after ${cursorOf(s.cursor)}`, "good");
      } else {
        note("connected");
      }
      save();
    }
    render();
  }

  function onEvent(e) {
    track(e);
    const data = e.json || {};
    if (e.type === "token") {
      run.text += data.text;
      run.step = "writing";
    } else if (e.type === "status") {
      run.step = data.step;
    } else if (e.type === "tool") {
      if (data.status === "running") {
        run.step = `calling ${data.name}…`;
        run.toolOpens = run.opens;
        note(`tool ${data.name} is running: nothing is published, heartbeats keep the stream open`);
      } else {
        run.step = "writing";
        const held = run.opens === run.toolOpens ? "the connection stayed open through the silence"
          : "the stream reconnected meanwhile";
        note(`tool ${data.name} done after ${data.seconds} s; ${held}`, "good");
      }
    }
    save();
    render();
  }

  function onEnd(e) {
    if (e) {
      track(e);
      const result = e.json || {};
      const exact = result.text === run.text && run.missing === 0 && run.duplicates === 0;
      run.verdict = exact
        ? { ok: true, text: `Complete. ${run.events} events, ids 1–${run.lastId} without a hole or a repeat; ` +
            `the streamed text matches the final result character for character.` }
        : { ok: false, text: `Complete, but the streamed text differs from the final result ` +
            `(${run.missing} missing, ${run.duplicates} repeated).` };
      note(`gateway.end: ${result.tokens} tokens in ${result.seconds} s; the stream is closed`, "good");
    } else {
      note("the run had already ended (204): nothing left to stream", "good");
    }
    run.ended = true;
    run.step = "done";
    save();
    render();
  }

  function track(e) {
    if (resumeFrom !== null) {
      const before = parseInt(resumeFrom, 10) || 0;
      const kind = e.id === before + 1 ? "good" : "bad";
      note(`first event after the reconnect: #${e.id}, right after #${before}`, kind);
      resumeFrom = null;
    }
    if (e.id <= run.lastId) run.duplicates++;
    else run.missing += e.id - run.lastId - 1;
    run.lastId = Math.max(run.lastId, e.id);
    run.cursor = e.cursor;
    run.events++;
    run.lastEventAt = Date.now();
  }

  // -- controls ---------------------------------------------------------------------

  async function start() {
    if (stream) stream.close();
    $("start").disabled = true;
    const options = query.has("duration") ? { duration: Number(query.get("duration")) } : {};
    try {
      const res = await fetch("/v1/demo/runs", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(options),
      });
      const body = await res.json();
      if (!res.ok) throw new Error(explain(res.status, body));
      run = fresh(body);
      note(`run ${run.session} started`);
      save();
      connect();
    } catch (err) {
      showError(err.message);
    } finally {
      $("start").disabled = false;
      render();
    }
  }

  function explain(status, body) {
    if (status === 401) return "This gateway needs a publisher key, so the page cannot start demo runs.";
    if (status === 404) return "Demo runs are turned off on this gateway (--no-demo).";
    return (body.error && body.error.message) || `The gateway answered ${status}.`;
  }

  function showError(message) {
    const verdict = $("verdict");
    verdict.hidden = false;
    verdict.className = "verdict bad";
    verdict.textContent = message;
  }

  function drop() {
    if (!stream || run.ended) return;
    note(`you dropped the connection at ${cursorOf(stream.cursor)}; reconnecting in 1 s`, "warn");
    save();
    stream.reconnect(1000);
    render();
  }

  // -- rendering ----------------------------------------------------------------------

  function render() {
    const state = run ? (stream ? stream.state : run.ended ? "ended" : "idle") : "idle";
    const pill = $("state");
    pill.dataset.state = state;
    pill.textContent = state;
    $("drop").disabled = !stream || state === "ended" || state === "closed" || state === "failed";
    if (!run) return;

    const text = $("text");
    text.replaceChildren(document.createTextNode(run.text));
    if (!run.ended) {
      const caret = document.createElement("span");
      caret.className = "caret";
      text.append(caret);
    }
    text.scrollTop = text.scrollHeight;
    $("step").textContent = run.step;
    $("step").dataset.step = run.ended ? "done" : run.step.startsWith("calling") ? "tool" : "busy";

    $("cursor").textContent = run.cursor || "–";
    $("events").textContent = run.events.toLocaleString();
    $("reconnects").textContent = run.reconnects;
    $("notices").textContent = `${run.gaps} / ${run.resets}`;
    const ids = $("ids");
    ids.textContent = run.lastId === 0 ? "–" : run.missing || run.duplicates
      ? `${run.missing} missing, ${run.duplicates} repeated` : `1–${run.lastId}, contiguous`;
    ids.className = run.missing || run.duplicates ? "bad" : run.lastId ? "good" : "";
    $("heartbeat").textContent = run.heartbeat;
    renderActivity();

    const verdict = $("verdict");
    verdict.hidden = !run.verdict;
    if (run.verdict) {
      verdict.className = "verdict " + (run.verdict.ok ? "good" : "bad");
      verdict.textContent = run.verdict.text;
    }
    $("timeline").replaceChildren(...run.timeline.slice().reverse().map((item) => {
      const li = document.createElement("li");
      li.className = item.kind;
      const time = document.createElement("time");
      time.textContent = item.when;
      li.append(time, document.createTextNode(item.text));
      return li;
    }));
    const session = `${origin}/v1/sessions/${run.session}`;
    const replay = run.ended || !run.cursor
      ? `# the whole run, from its first event:\ncurl -N ${session}/stream`
      : `# everything after your cursor, then live:\ncurl -N ${session}/stream -H 'Last-Event-ID: ${run.cursor}'`;
    $("curl").textContent = `${replay}\n\n# the run's status, presence and final result:\ncurl ${session}`;
  }

  function renderActivity() {
    const activity = $("activity");
    if (!run || !run.lastEventAt) {
      activity.textContent = "–";
      return;
    }
    if (run.ended) {
      activity.textContent = new Date(run.lastEventAt).toLocaleTimeString([], { hour12: false });
      activity.className = "";
      return;
    }
    const quiet = (Date.now() - run.lastEventAt) / 1000;
    const open = stream && stream.state === "open";
    activity.textContent = quiet < 1 ? "just now" : `${quiet.toFixed(1)} s ago`;
    activity.className = open && quiet > run.heartbeat ? "quiet" : "";
    activity.title = open && quiet > run.heartbeat ? "quiet, but the heartbeats keep the connection open" : "";
  }

  // -- start-up -------------------------------------------------------------------------

  $("start").addEventListener("click", start);
  $("drop").addEventListener("click", drop);
  $("curl").textContent = $("curl").textContent.replaceAll("localhost:8000", origin);
  setInterval(renderActivity, 200);
  if (run && !run.ended) {
    note(`page reloaded: resuming the run, text restored up to #${run.lastId}`);
    save();
    connect();
  }
  render();
})();
