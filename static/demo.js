// The demo page: start a simulated run, render it through SSEGateway, show what the connection does.
// The agent writes its answer as one message (message.start, then token deltas as message.append,
// then message.end); the helper assembles it (stream.message("answer")) and the page shows its text.
// The rest of the run's view (step, approval, events received) is built by the helper's `reduce`. The
// helper persists both with the cursor (`persist: true`), so a reload restores the answer and resumes
// right after it; a tab that opens the run later gets the answer whole (message.snapshot), then its
// deltas. The page itself only remembers which run it is showing. The page also talks back: Stop sends the
// run a cancel, and the approval prompt answers the run's approval.request (stream.cancel/approve); every
// tab sees those inputs once, as gateway.input events in the stream. The run's status is shown plainly:
// running, cancelling… (a Stop is on its way or the agent has not ended the run yet), then how it ended,
// as the helper reports it (stream.outcome: completed, failed, cancelled or timed out).
// /?session=ID (&token=T) shows a run that is already going, e.g. in a second tab.
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const CURRENT = "sse-gateway-demo:run"; // which run this tab shows: {session, streamUrl, heartbeat}
  const TIMELINE_MAX = 40;
  const origin = location.origin;
  const query = new URLSearchParams(location.search);

  let run = load(); // the run being shown
  let stream = null; // its SSEGateway stream: stream.view is what `reduce` built from the events
  let verdict = null;
  let timeline = [];
  let resumeFrom = null; // the cursor a (re)connection resumed after, until the next event shows it
  let toolOpens = 0;
  let answered = null; // the approval this tab answered (its buttons stay off)
  let stopSent = false; // this tab pressed Stop
  let stopKey = null; // the idempotency key of this tab's Stop: pressing again repeats it, never a second cancel
  let stopAnswered = false; // the gateway has this tab's cancel

  const LABELS = { completed: "completed", failed: "failed", cancelled: "cancelled", timed_out: "timed out" };
  const ANSWER = "answer"; // the id of the run's message
  // Every type the run publishes (the helper assembles message.* anyway; listed, `reduce` counts them too).
  const EVENTS = ["status", "tool", "approval.request", "gateway.input", "message.start", "message.append",
    "message.end", "message.snapshot"];

  // -- the run's view: built from its events, one at a time ------------------------------------

  const initial = { step: "starting", events: 0, approval: null, stopping: false, cancels: 0 };

  function reduce(view, e) {
    const next = { ...view, events: view.events + 1 };
    const data = e.json || {};
    if (e.type.startsWith("message.")) {
      if (view.step === "thinking" || view.step === "starting") next.step = "writing";
    } else if (e.type === "status") {
      next.step = data.step;
    } else if (e.type === "tool") {
      next.step = data.status === "running" ? `calling ${data.name}…` : "writing";
      next.approval = null; // answered, or gone ahead without an answer
    } else if (e.type === "approval.request") {
      next.step = "waiting for your approval";
      next.approval = { id: data.approval_id, tool: data.tool, timeout: data.timeout };
    } else if (e.type === "gateway.input") {
      if (data.kind === "approval" && next.approval && next.approval.id === data.approval_id) {
        next.approval = null;
        next.step = data.decision === "approve" ? "approved" : "denied";
      } else if (data.kind === "cancel") {
        next.stopping = true;
        next.cancels += 1;
        next.approval = null;
        next.step = "cancelling…";
      }
    }
    return next;
  }

  function load() {
    let stored = null;
    try {
      stored = JSON.parse(sessionStorage.getItem(CURRENT));
    } catch (_) {
      stored = null;
    }
    const asked = query.get("session"); // a run to show, from a link (another tab's "watch" link)
    if (!asked || (stored && stored.session === asked)) return stored;
    const token = query.get("token");
    const streamUrl = `/v1/sessions/${encodeURIComponent(asked)}/stream`
      + (token ? `?token=${encodeURIComponent(token)}` : "");
    const shown = { session: asked, streamUrl, heartbeat: null };
    sessionStorage.setItem(CURRENT, JSON.stringify(shown));
    return shown;
  }

  /** A link that shows this run in another tab or browser (with the run's token, if it has one). */
  function watchLink() {
    const u = new URL("/", origin);
    u.searchParams.set("session", run.session);
    const token = new URL(run.streamUrl, origin).searchParams.get("token");
    if (token) u.searchParams.set("token", token);
    return u.href;
  }

  function note(text, kind) {
    const when = new Date().toLocaleTimeString([], { hour12: false });
    timeline.push({ when, text, kind: kind || "" });
    if (timeline.length > TIMELINE_MAX) timeline.shift();
  }

  function cursorOf(cursor) {
    return cursor ? cursor : "the start";
  }

  // -- the stream -------------------------------------------------------------------

  function connect() {
    stream = SSEGateway.connect(run.streamUrl, {
      events: EVENTS,
      onInput,
      initial,
      reduce,
      persist: true, // the view, the answer and the cursor, together, in sessionStorage
      onView: render, // after each event, the answer's deltas too (stream.message(ANSWER) is assembled first)
      onState: onState,
      onEvent: onEvent,
      onEnd: onEnd,
      onGap: (gap) => note(`gateway.gap: events ${gap.from}–${gap.to} were trimmed by retention`, "warn"),
      onReset: (reset) => note(`gateway.reset: the session restarted (epoch ${reset.epoch}); ` +
        "rendering it from the start", "warn"),
      onError: (err) => {
        note(`the stream stopped: ${err.code}${err.status ? ` (HTTP ${err.status})` : ""}; ${err.message}`, "bad");
        verdict = { ok: false, text: `The stream stopped: ${err.message}.` };
        render();
      },
    });
    if (stream.restored && stream.state !== "ended") {
      note(`page reloaded: the helper restored the answer (${answerText().length.toLocaleString()} characters); ` +
        `resuming after ${cursorOf(stream.cursor)}`);
      resumeFrom = stream.cursor;
    }
  }

  function onState(state, s) {
    if (state === "open") {
      if (s.reconnects) {
        resumeFrom = s.cursor;
        note(`reconnected, resuming after ${cursorOf(s.cursor)}`, "good");
      } else {
        note("connected");
      }
    }
    render();
  }

  /** The answer's text as the helper assembled it so far. */
  function answerText() {
    const answer = stream && stream.message(ANSWER);
    return answer ? answer.text : "";
  }

  function onEvent(e) {
    if (resumeFrom !== null) {
      const what = e.type === "message.append" ? "the next delta of the answer"
        : e.type === "message.snapshot" ? "the answer, whole" : e.type;
      note(`first event after ${cursorOf(resumeFrom)}: ${what} (cursor ${e.cursor})`, "good");
      resumeFrom = null;
    }
    const data = e.json || {};
    if (e.type === "tool" && data.status === "running") {
      toolOpens = stream.reconnects;
      note(`tool ${data.name} is running: nothing is published, heartbeats keep the stream open`);
    } else if (e.type === "tool") {
      const held = stream.reconnects === toolOpens ? "the connection stayed open through the silence"
        : "the stream reconnected meanwhile";
      note(`tool ${data.name} done after ${data.seconds} s; ${held}`, "good");
    }
  }

  function onInput(input) {
    if (input.kind === "cancel") {
      note(`gateway.input #${input.inputId}: cancel; the run is cancelling until the agent ends it`, "warn");
    }
    else if (input.kind === "approval") note(`gateway.input #${input.inputId}: ${input.decision} ${input.approvalId}`, "good");
    else note(`gateway.input #${input.inputId}: ${input.kind}`);
  }

  function onEnd(end) {
    const view = stream.view;
    const outcome = end.outcome;
    const result = outcome.result || {};
    const label = LABELS[outcome.status] || outcome.status;
    const text = answerText();
    const after = result.tokens !== undefined ? ` after ${result.tokens} tokens` : "";
    const what = outcome.status === "completed" ? "Complete."
      : outcome.status === "cancelled" ? `Cancelled${after}.` : `The run ${label}.`;
    const checks = `${view.events.toLocaleString()} events, none repeated`;
    if (stream.duplicates) {
      verdict = { ok: false, text: `${what} But the stream repeated ${stream.duplicates} events.` };
    } else if (typeof result.text !== "string") {
      verdict = { ok: outcome.status === "completed", text: `${what} ${checks}.` };
    } else if (result.text === text) {
      const which = outcome.status === "completed" ? "final" : "partial";
      verdict = { ok: true, text: `${what} ${checks}; the answer assembled from its deltas matches the ${which} ` +
        "result character for character." };
    } else {
      verdict = { ok: false, text: `${what} But the assembled answer differs from the result.` };
    }
    const code = outcome.error && outcome.error.code;
    const how = code && code !== outcome.status ? ` (${code})` : "";
    note(end.fromSession ? `the run had already ended (204): the helper fetched how it ended from the session: ${label}`
      : stream.lastEventAt === null ? "page reloaded after the end: the helper restored the text and the outcome"
      : `gateway.end: the run ended ${label}${how}; the stream is closed`, outcome.status === "completed" ? "good"
      : "warn");
    render();
  }

  // -- controls ---------------------------------------------------------------------

  async function start() {
    if (stream) {
      stream.close();
      stream.forget(); // the previous run's stored view
    }
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
      run = { session: body.session, streamUrl: body.stream_url, heartbeat: body.heartbeat };
      sessionStorage.setItem(CURRENT, JSON.stringify(run));
      verdict = null;
      timeline = [];
      answered = null;
      stopSent = false;
      stopKey = null;
      stopAnswered = false;
      if (query.has("session")) { // this tab now shows its own run, also after a reload
        query.delete("session");
        query.delete("token");
        history.replaceState(null, "", "/" + (query.toString() ? `?${query}` : ""));
      }
      note(`run ${run.session} started`);
      connect();
    } catch (err) {
      verdict = { ok: false, text: err.message };
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

  /** Input for the agent: a failure is told in the timeline, with the gateway's code. */
  async function sendInput(what, send) {
    try {
      const sent = await send();
      note(`you sent ${what}: input #${sent.id}`);
      return true;
    } catch (err) {
      const why = err.code === "approval_answered" ? "another tab answered first"
        : err.code === "session_completed" ? "the run had already ended" : `${err.code}: ${err.message}`;
      note(`${what} was not taken: ${why}`, "bad");
      return false;
    } finally {
      render();
    }
  }

  function stop() {
    if (!stream || stream.state === "ended") return;
    stopSent = true;
    stopKey = stopKey || `stop-${run.session}-${Math.random().toString(36).slice(2, 10)}`;
    $("stop").disabled = true;
    note("you pressed Stop: sending a cancel (retried with the same key until the gateway has it)", "warn");
    sendInput("a cancel", () => stream.cancel("the user pressed Stop", { idempotencyKey: stopKey })).then((ok) => {
      stopSent = ok; // not taken: Stop may be pressed again, and sends the same cancel
      stopAnswered = ok;
      render();
    });
  }

  function answer(decision) {
    const approval = stream && stream.view.approval;
    if (!approval) return;
    answered = approval.id;
    $("approve").disabled = $("deny").disabled = true;
    sendInput(`${decision} for ${approval.tool}`, () => stream.approve(approval.id, decision));
  }

  function drop() {
    if (!stream || stream.state === "ended") return;
    note(`you dropped the connection at ${cursorOf(stream.cursor)}; reconnecting in 1 s`, "warn");
    stream.reconnect(1000);
    render();
  }

  // -- rendering ----------------------------------------------------------------------

  function render() {
    const state = stream ? stream.state : "idle";
    const pill = $("state");
    pill.dataset.state = state;
    pill.textContent = state;
    const over = !stream || state === "ended" || state === "closed" || state === "failed";
    $("drop").disabled = over;
    $("stop").disabled = over || stopSent || stream.view.stopping;
    renderOutcome(state);
    const box = $("verdict");
    box.hidden = !verdict;
    if (verdict) {
      box.className = "verdict " + (verdict.ok ? "good" : "bad");
      box.textContent = verdict.text;
    }
    if (!run || !stream) return;

    const view = stream.view;
    const ended = state === "ended";
    const answer = stream.message(ANSWER);
    const text = $("text");
    text.replaceChildren(document.createTextNode(answer ? answer.text : ""));
    if (!ended && (!answer || answer.status === "open")) {
      const caret = document.createElement("span");
      caret.className = "caret";
      text.append(caret);
    }
    text.scrollTop = text.scrollHeight;
    const status = runStatus(state);
    $("status").textContent = status;
    $("status").dataset.status = status;
    $("step").textContent = ended ? status : view.step;
    $("step").dataset.step = ended ? (stream.outcome ? stream.outcome.status : "done")
      : view.step.startsWith("calling") ? "tool" : "busy";
    const approval = ended ? null : view.approval;
    $("approval").hidden = !approval;
    if (approval) {
      $("approval-tool").textContent = approval.tool;
      $("approval-timeout").textContent = approval.timeout;
      $("approve").disabled = $("deny").disabled = answered === approval.id;
    }

    $("cursor").textContent = stream.cursor || "–";
    $("events").textContent = view.events.toLocaleString();
    $("reconnects").textContent = stream.reconnects;
    $("notices").textContent = `${stream.gaps} / ${stream.resets}`;
    const message = $("message");
    message.textContent = answer ? `${answer.status}, ${answer.text.length.toLocaleString()} characters` : "–";
    message.dataset.status = answer ? answer.status : "";
    if (run.heartbeat) $("heartbeat").textContent = run.heartbeat;
    const link = $("watch");
    link.hidden = false;
    link.href = watchLink();
    renderActivity();

    $("timeline").replaceChildren(...timeline.slice().reverse().map((item) => {
      const li = document.createElement("li");
      li.className = item.kind;
      const time = document.createElement("time");
      time.textContent = item.when;
      li.append(time, document.createTextNode(item.text));
      return li;
    }));
    const session = `${origin}/v1/sessions/${run.session}`;
    const replay = ended || !stream.cursor
      ? `# the whole run, from its first event:\ncurl -N ${session}/stream`
      : `# everything after your cursor, then live:\ncurl -N ${session}/stream -H 'Last-Event-ID: ${stream.cursor}'`;
    $("curl").textContent = `${replay}\n\n# the run's status, presence and final result:\ncurl ${session}`;
  }

  /** The run's status in a word or two: running, waiting for approval, cancelling…, or how it ended. */
  function runStatus(state) {
    if (state === "ended" && stream.outcome) return LABELS[stream.outcome.status] || stream.outcome.status;
    if (stream.view.stopping || stopSent) return "cancelling…";
    return stream.view.approval ? "waiting for approval" : "running";
  }

  /** The banner over the text: what is happening to the run, for someone who just arrived. */
  function renderOutcome(state) {
    const box = $("outcome");
    if (!run || !stream) {
      box.hidden = true;
      return;
    }
    const status = runStatus(state);
    const outcome = state === "ended" ? stream.outcome : null;
    const error = outcome && outcome.error ? outcome.error : null;
    const why = error && error.message ? error.message : null;
    let detail;
    if (outcome && outcome.status === "completed") detail = "The agent finished: the text below is its result.";
    else if (outcome && outcome.status === "cancelled") {
      detail = error && error.code === "cancel_unconfirmed"
        ? "Stop was pressed and the agent never confirmed, so the gateway ended the run."
        : `The agent stopped at the user's request${why ? ` (“${why}”)` : ""}. The text below is what it had written.`;
    } else if (outcome && outcome.status === "timed_out") {
      detail = "The agent went silent, so the gateway ended the run.";
    } else if (outcome) detail = `The agent reported an error${why ? `: ${why}` : ""}.`;
    else if (status === "cancelling…") {
      detail = stopSent && !stopAnswered && !stream.view.stopping
        ? "Sending Stop to the agent… it is retried until the gateway has it."
        : "Stop was sent. The run ends as soon as the agent confirms.";
    } else if (status === "waiting for approval") detail = "The agent asks before calling a tool: answer below.";
    else detail = state === "failed" ? "The page lost the stream." : "The agent is writing. Stop cancels the run.";
    box.hidden = false;
    box.dataset.status = outcome ? outcome.status : status === "cancelling…" ? "cancelling"
      : status === "waiting for approval" ? "waiting" : "running";
    $("outcome-label").textContent = status[0].toUpperCase() + status.slice(1);
    $("outcome-detail").textContent = detail;
  }

  function renderActivity() {
    const activity = $("activity");
    if (!stream || !stream.lastEventAt) {
      activity.textContent = "–";
      return;
    }
    if (stream.state === "ended") {
      activity.textContent = new Date(stream.lastEventAt).toLocaleTimeString([], { hour12: false });
      activity.className = "";
      return;
    }
    const quiet = (Date.now() - stream.lastEventAt) / 1000;
    const open = stream.state === "open";
    activity.textContent = quiet < 1 ? "just now" : `${quiet.toFixed(1)} s ago`;
    const quietSpell = open && run.heartbeat && quiet > run.heartbeat;
    activity.className = quietSpell ? "quiet" : "";
    activity.title = quietSpell ? "quiet, but the heartbeats keep the connection open" : "";
  }

  // -- start-up -------------------------------------------------------------------------

  $("start").addEventListener("click", start);
  $("drop").addEventListener("click", drop);
  $("stop").addEventListener("click", stop);
  $("approve").addEventListener("click", () => answer("approve"));
  $("deny").addEventListener("click", () => answer("deny"));
  $("curl").textContent = $("curl").textContent.replaceAll("localhost:8000", origin);
  setInterval(renderActivity, 200);
  if (run) connect(); // a reload: the helper restores the run's view and resumes after its cursor
  render();
})();
