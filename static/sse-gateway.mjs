// The client helper as an ES module: `import { connect } from "/static/sse-gateway.mjs"`.
// A classic <script> cannot contain `export`, so the code lives in sse-gateway.js (which also
// runs as module code) and this file re-exports what it defines.
import "./sse-gateway.js";

export const { connect, outcomeOf, GatewayStream, GatewayEvent } = globalThis.SSEGateway;
export default globalThis.SSEGateway;
