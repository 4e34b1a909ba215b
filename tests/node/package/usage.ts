// Type-checked with tsc against the installed package's .d.ts files: what an app would write.
import { connect, type GatewayError, type GatewayEvent, type GatewayStream } from "sse-gateway-client";
import { useGatewaySession } from "sse-gateway-client/react";

interface View { text: string; ids: number[] }

const stream: GatewayStream<View> = connect<View>("/v1/sessions/run1/stream", {
  events: ["token"],
  initial: { text: "", ids: [] },
  reduce: (view, e) => ({ text: view.text + (e.json as { t: string }).t, ids: [...view.ids, e.id] }),
  persist: { key: "run1", storage: sessionStorage },
  onView: (view) => console.log(view.text.length),
  onEnd: (end: GatewayEvent) => console.log(end.result, end.cursor),
  onError: (err: GatewayError) => {
    if (err.code === "unreachable" || err.code === "not_found") console.log(err.status, err.message);
  },
  onState: (state) => console.log(state === "reconnecting"),
  getToken: async () => "a-new-token",
  giveUpMs: 30_000,
  maxAttempts: 5,
});
stream.reconnect(1000);
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
  const { view, status, result, error } = useGatewaySession({
    url: "/v1/sessions/run1/stream",
    initial: "",
    reduce: (text: string, e) => text + String(e.data),
  });
  const events = useGatewaySession({ url: null }).view;
  return `${status} ${view.length} ${String(result)} ${error?.code ?? ""} ${events.map((e) => e.id).join()}`;
}
export { text, cursor, wrong };
