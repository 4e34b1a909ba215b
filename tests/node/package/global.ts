/// <reference types="sse-gateway-client" />
// A page that loads the script build with a <script> tag: the global SSEGateway is typed.
const stream = SSEGateway.connect("/v1/sessions/run1/stream", {
  initial: { text: "" },
  reduce: (view: { text: string }, e) => ({ text: view.text + (e.json as { text: string }).text }),
});
const text: string = stream.view.text;
export { text };
