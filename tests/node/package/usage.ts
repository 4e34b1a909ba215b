// Type-checked with tsc against the installed package's .d.ts files: what an app would write.
import {
  connect,
  outcomeOf,
  type ApprovalRequest,
  type EndStatus,
  type Outcome,
  type RunStatus,
  type SessionInfo,
  type GatewayError,
  type GatewayEvent,
  type GatewayStream,
  type InputError,
  type InputNotice,
  type InputSent,
  type Message,
  type MessageStatus,
} from "sse-gateway-client";
import { useGatewaySession } from "sse-gateway-client/react";

interface View { text: string; ids: number[] }

const stream: GatewayStream<View> = connect<View>("/v1/sessions/run1/stream", {
  events: ["token"],
  initial: { text: "", ids: [] },
  reduce: (view, e) => ({ text: view.text + (e.json as { t: string }).t, ids: [...view.ids, e.id] }),
  persist: { key: "run1", storage: sessionStorage },
  onView: (view) => console.log(view.text.length),
  onEnd: (end: GatewayEvent) => {
    const outcome: Outcome | undefined = end.outcome;
    if (outcome && outcome.status === "cancelled") console.log(outcome.error, outcome.result);
    console.log(end.result, end.cursor, end.fromSession === true, end.runStatus ?? "");
  },
  onError: (err: GatewayError) => {
    if (err.code === "unreachable" || err.code === "not_found") console.log(err.status, err.message);
  },
  onState: (state) => console.log(state === "reconnecting"),
  getToken: async () => "a-new-token",
  giveUpMs: 30_000,
  maxAttempts: 5,
});
stream.reconnect(1000);

// The return path: input for the agent, approvals, and every tab's view of what users sent.
const withInput = connect("/v1/sessions/run1/stream?token=t", {
  events: ["token", "gateway.input"],
  onInput: (input: InputNotice) => console.log(input.inputId, input.kind, input.decision ?? "", input.event.cursor),
  onApprovalRequest: (request: ApprovalRequest) => withInput.approve(request.approvalId, "deny", { note: "no" }),
});
const sent: Promise<InputSent> = withInput.send("steer", { text: "shorter" }, { idempotencyKey: "tab1-1" });
sent.then((answer) => console.log(answer.id, answer.event_id, answer.input_last_id));
withInput.cancel("enough").catch((err: InputError) => console.log(err.code === "session_completed", err.status));
withInput.approve("rm-1").then((a) => a.kind === "approval");
const open = Object.values(withInput.approvals).filter((a) => a.decision === null).map((a) => a.approvalId);
// @ts-expect-error: not a kind of input
withInput.send("shout", "hi");
// @ts-expect-error: a decision is approve or deny
withInput.approve("rm-1", "maybe");

// Messages, assembled from message.* events: one object per message, persisted with the messages alone.
const answers = connect("/v1/sessions/run1/stream", {
  persist: true,
  onMessage: (m: Message) => console.log(m.id, m.type ?? "", m.text.length, m.status === "open", m.error, m.partial),
});
const statuses: MessageStatus[] = answers.messages.map((m) => m.status);
const first: Message | undefined = answers.message("answer-1");
// @ts-expect-error: a message is open, finished or failed
const notOpen: MessageStatus = "closed";

const ended: EndStatus | undefined = stream.outcome?.status;
void stream.fetchSession().then((session: SessionInfo) => {
  const status: RunStatus = session.run_status;
  return status === "cancelling" || session.outcome === "timed_out";
});
const guessed: Outcome = outcomeOf({ status: "failed", error: "x" }, "completed");
// @ts-expect-error: not an outcome
const notAStatus: EndStatus = "stopped";
const text: string = stream.view.text;
const cursor: string | null = stream.cursor;
stream.close();

// @ts-expect-error: not an error code the helper reports
connect("/s", { onError: (err) => err.code === "timeout" });
// @ts-expect-error: persist keys are strings
connect("/s", { persist: { key: 42 }, reduce: (v: number) => v });
// @ts-expect-error: the view is what reduce returns
const wrong: number = connect("/s", { initial: "", reduce: (v: string) => v }).view;

export function Answer(): string {
  const { view, status, result, error, outcome } = useGatewaySession({
    url: "/v1/sessions/run1/stream",
    initial: "",
    reduce: (text: string, e) => text + String(e.data),
  });
  const events = useGatewaySession({ url: null }).view;
  const { send, cancel, approve, approvals, messages } = useGatewaySession({ url: "/v1/sessions/run1/stream" });
  const shown: string = messages.map((m) => m.text).join("");
  void send("message", "hi").then((a: InputSent) => a.id);
  void cancel().catch((err: InputError) => err.code);
  void approve(Object.keys(approvals)[0], "approve");
  const done: EndStatus | "" = outcome?.status ?? "";
  return `${status} ${view.length} ${String(result)} ${error?.code ?? ""} ${events.map((e) => e.id).join()} ${done} ${shown}`;
}
export { text, cursor, wrong, open, ended, guessed, notAStatus, statuses, first, notOpen };
