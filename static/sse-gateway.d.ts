// Types for sse-gateway.js / sse-gateway.mjs (the package "sse-gateway-client").

/** A connection's state. `ended`, `closed` and `failed` are final. */
export type StreamState = "connecting" | "open" | "reconnecting" | "ended" | "closed" | "failed";

/** Why a stream stopped for good (see `onError`). */
export type ErrorCode =
  | "unauthorized" // 401, and no (working) getToken
  | "forbidden" // 403: a token for another session or an earlier life of it
  | "not_found" // 404: no such session (deleted, expired, never created)
  | "bad_request" // 400: a malformed URL or cursor
  | "refused" // another status that retrying cannot change (405, 406, 415)
  | "cors" // the gateway answered, but the page's origin may not read it
  | "unreachable"; // network failures, 429 or 5xx for giveUpMs or maxAttempts

export interface GatewayError {
  code: ErrorCode;
  /** The HTTP status, 0 when there was none (network, CORS). */
  status: number;
  /** For people; may change. */
  message: string;
  /** What getToken() threw, when it did. */
  error?: unknown;
}

export interface GapNotice {
  from: number;
  to: number;
}

export interface ResetNotice {
  epoch: string;
  last_id: number;
}

/** How a run ended. The gateway ends a silent agent's run as timed_out; the agent ends it otherwise. */
export type EndStatus = "completed" | "failed" | "cancelled" | "timed_out";
/** A session's run_status: an ended run's EndStatus, or running, or cancelling (a cancel was sent,
 * the run has not ended yet). */
export type RunStatus = "running" | "cancelling" | EndStatus;

/** How a run ended, from its gateway.end: a completed run's `result` (v1 data), or a run that did
 * not complete with its `error` (and the `result` it had, or null). */
export interface Outcome {
  status: EndStatus;
  result: any;
  /** null for a completed run; otherwise what the agent or the gateway gave, e.g. {code, message}. */
  error: any;
}

/** How a message stands: being written, or closed. */
export type MessageStatus = "open" | "finished" | "failed";

/** One message (message.start/append/reset/end/replace, or a replay's message.snapshot), assembled.
 * Each change is a new object. */
export interface Message {
  /** The publisher's id for it. */
  id: string;
  /** The type it was started with, or null. */
  type: string | null;
  metadata: any;
  /** Its whole text so far. */
  text: string;
  status: MessageStatus;
  /** What a failed message was ended with (e.g. {code, message}), else null. */
  error: any;
  /** The log id of its message.start (null if unknown): `messages` are kept in this order. */
  start: number | null;
  /** true when its start came before the stream's start point (a last_event_id given in the URL):
   * `text` holds only what came after it. */
  partial?: boolean;
}

/** One entry of the session's log. */
export declare class GatewayEvent {
  /** The event type: "message", "token", "message.append", ..., or "gateway.end". */
  readonly type: string;
  /** The log id at the head of its cursor (1, 2, 3, ...), for display: replayed message snapshots may
   * share one. Resume and compare with `cursor`, never with this. */
  readonly id: number;
  /** Where a stream resumes after this event: "ID:EPOCH", or "ID/HOLD:EPOCH" while a replay holds
   * messages back. An opaque string: store it and send it back as it is. */
  readonly cursor: string;
  /** The data as text (JSON text for JSON data). */
  readonly data: string;
  /** The data parsed as JSON, or undefined for text that is not JSON. */
  readonly json: any;
  /** For gateway.end: its data, the run's result (null when completed without one; for a run that did
   * not complete, {status, error, result?}); undefined otherwise. */
  readonly result: any;
  /** For gateway.end: how the run ended; undefined otherwise. */
  readonly outcome: Outcome | undefined;
  /** For a gateway.end made from the session: its run_status, which `outcome` follows. */
  runStatus?: EndStatus;
  /** true on a gateway.end made from the session after a 204 (the stream had nothing left to send). */
  fromSession?: boolean;
}

/** The kinds of input a user sends an agent. */
export type InputKind = "message" | "steer" | "approval" | "cancel";
export type Decision = "approve" | "deny";

/** The gateway's answer to an input (201, or 200 for a repeated idempotency key). */
export interface InputSent {
  /** The input's id (1, 2, ... per session; apart from event ids). */
  id: number;
  session: string;
  kind: InputKind;
  /** The id of its gateway.input mirror in the output. */
  event_id: number;
  input_last_id: number;
  epoch: string;
}

/** A refused input: `code` is the gateway's (approval_answered, approval_not_found, insufficient_scope,
 * session_completed, cross_site_refused, ...), or "unreachable", "invalid_kind", "no_session_url". */
export interface InputError extends Error {
  code: string;
  /** The HTTP status, 0 when there was none. */
  status: number;
  /** The gateway's whole error body, when it sent one (approval_answered carries `input_id`). */
  body?: any;
}

/** The session, as GET /v1/sessions/{id} answers (the fields a page needs; there are more). */
export interface SessionInfo {
  id: string;
  epoch: string;
  /** "completed" once the run ended, whatever its outcome. */
  status: "open" | "completed";
  /** How the run is going, or how it ended (exact, unlike guessing from gateway.end's data). */
  run_status: RunStatus;
  outcome: EndStatus | null;
  result: any;
  error: any;
  last_id: number;
  acked_id: number;
  input_last_id: number;
  input_acked_id: number;
  cancel_requested_at: string | null;
  [field: string]: any;
}

export interface SendOptions {
  /** One per user action (default: a fresh one per call, sent again on each retry). */
  idempotencyKey?: string;
  approvalId?: string;
  decision?: Decision;
}

/** A user's input, as every tab sees it (a gateway.input event). */
export interface InputNotice {
  inputId: number;
  kind: InputKind;
  data: any;
  /** For an approval: which, and the answer. */
  approvalId?: string;
  decision?: Decision;
  event: GatewayEvent;
}

/** The agent asks the user (an approval.request event). */
export interface ApprovalRequest {
  approvalId: string;
  /** The event's data: {approval_id, ...whatever the agent shows the user}. */
  data: any;
  event: GatewayEvent;
}

/** An approval the agent asked for; `decision` is null while it is open. */
export interface ApprovalState {
  approvalId: string;
  data: any;
  cursor: string;
  decision: Decision | null;
  inputId: number | null;
}

export interface PersistOptions<V = any> {
  /** Storage key; default "sse-gateway:view:" + the stream URL's path. */
  key?: string;
  /** Where the view and cursor are kept; default sessionStorage (per tab). null: nowhere. */
  storage?: Pick<Storage, "getItem" | "setItem" | "removeItem"> | null;
  /** Save at most this often while events arrive, in ms (default 100); always on pagehide and at the end. */
  saveMs?: number;
  /** Same as the top-level options, accepted here too. */
  reduce?: (view: V, event: GatewayEvent) => V;
  initial?: V | (() => V);
}

export interface ConnectOptions<V = any> {
  /** Event types to receive besides "message" (and give `reduce`: list "gateway.input" or
   * "approval.request" to fold them into the view; they reach onInput/onApprovalRequest anyway). */
  events?: string[];
  /** Builds the page's view from the events, one at a time; required by `persist`. */
  reduce?: (view: V, event: GatewayEvent) => V;
  /** The view before the first event (copied), or a function returning it. */
  initial?: V | (() => V);
  /** Keep the view, the messages and the cursor across reloads (true: sessionStorage, default key);
   * needs `reduce` or `onMessage`. */
  persist?: boolean | PersistOptions<V>;

  onEvent?: (event: GatewayEvent, stream: GatewayStream<V>) => void;
  /** After the view is restored or built, and after each event that changed it. */
  onView?: (view: V, stream: GatewayStream<V>) => void;
  /** Once: gateway.end, or the session's result when the cursor was already at the end (204);
   * `end.outcome` says how the run ended. */
  onEnd?: (end: GatewayEvent, stream: GatewayStream<V>) => void;
  /** Once: the stream stopped for good. */
  onError?: (error: GatewayError, stream: GatewayStream<V>) => void;
  onGap?: (gap: GapNotice, stream: GatewayStream<V>) => void;
  onReset?: (reset: ResetNotice, stream: GatewayStream<V>) => void;
  onState?: (state: StreamState, stream: GatewayStream<V>) => void;
  /** The gateway confirmed the acknowledgement of `cursor`. */
  onAck?: (cursor: string, stream: GatewayStream<V>) => void;
  /** A message was started, appended to, reset, ended or replaced (or came whole in a replay); also
   * once per message restored from storage at the start. */
  onMessage?: (message: Message, stream: GatewayStream<V>) => void;
  /** Each input a user sent (from any tab), once, in order among the agent's events. */
  onInput?: (input: InputNotice, stream: GatewayStream<V>) => void;
  /** The agent asks for an approval; answer with stream.approve(request.approvalId, ...). */
  onApprovalRequest?: (request: ApprovalRequest, stream: GatewayStream<V>) => void;

  /** A fresh subscribe token after a 401 (sent as ?token=, or `tokenParam`). */
  getToken?: (stream: GatewayStream<V>) => string | Promise<string>;
  tokenParam?: string;
  /** Send cookies cross-origin (the sse_gateway_token cookie). */
  withCredentials?: boolean;
  /** POST the end event's cursor to .../ack when the run ends (default true). */
  ack?: boolean;
  /** The session's URL, for its result and acks; default: the stream URL without "/stream". */
  sessionUrl?: string | URL;
  /** Backoff after a failed attempt, first and largest, in ms (1000, 30000). */
  retryMs?: number;
  maxRetryMs?: number;
  /** Give up ("unreachable") after this long without a connection, in ms (default 60000); an input's
   * retries (send, cancel, approve) go on for as long. */
  giveUpMs?: number;
  /** ... or after this many failed attempts in a row (default Infinity). */
  maxAttempts?: number;
}

export declare class GatewayStream<V = any> {
  constructor(url: string | URL, options?: ConnectOptions<V>);
  readonly options: ConnectOptions<V>;
  readonly url: URL;
  readonly state: StreamState;
  /** The cursor of the last event received ("ID:EPOCH" or "ID/HOLD:EPOCH"), or null. Opaque. */
  readonly cursor: string | null;
  /** The session's messages, in the order they began (persisted with the view). */
  readonly messages: readonly Message[];
  /** The view `reduce` built (null without reduce). */
  readonly view: V;
  /** gateway.end's data, the run's result, once it ended; undefined before. */
  readonly result: any;
  /** How the run ended, once it did; undefined before. */
  readonly outcome: Outcome | undefined;
  readonly error: GatewayError | null;
  /** The last cursor the gateway confirmed as acknowledged. */
  readonly acked: string | null;
  /** true when the view and cursor came from storage. */
  readonly restored: boolean;
  readonly reconnects: number;
  readonly gaps: number;
  readonly resets: number;
  readonly duplicates: number;
  /** Date.now() of the last event, or null. */
  readonly lastEventAt: number | null;
  /** The approvals the agent asked for, by id (persisted with the view). */
  readonly approvals: Record<string, ApprovalState>;
  /** The message with this id, or undefined. */
  message(id: string): Message | undefined;
  /** Send the agent input with the stream's token (scope "input") or cookies; rejects with an InputError. */
  send(kind: InputKind, data?: any, options?: SendOptions): Promise<InputSent>;
  /** A "cancel" input ({reason} when given). */
  cancel(reason?: string, options?: SendOptions): Promise<InputSent>;
  /** An "approval" input answering `approvalId` (decision default "approve"). */
  approve(approvalId: string, decision?: Decision, data?: any, options?: SendOptions): Promise<InputSent>;
  /** The session now (its run_status is the exact outcome of an ended run); rejects with an InputError. */
  fetchSession(): Promise<SessionInfo>;
  /** Stop for good; a persisted view is kept. */
  close(): void;
  /** Drop the connection and resume from the cursor after delayMs; also restarts a failed stream. */
  reconnect(delayMs?: number): void;
  /** Remove the persisted view and cursor. */
  forget(): void;
}

export declare function connect<V = any>(url: string | URL, options?: ConnectOptions<V>): GatewayStream<V>;

/** The outcome a gateway.end's data (parsed) describes: an object whose `status` is failed, cancelled or
 * timed_out is such an end, anything else a completed run's result. `runStatus` (the session's) decides
 * instead when given. */
export declare function outcomeOf(data: any, runStatus?: EndStatus): Outcome;

declare const SSEGateway: {
  connect: typeof connect;
  outcomeOf: typeof outcomeOf;
  GatewayStream: typeof GatewayStream;
  GatewayEvent: typeof GatewayEvent;
};
export default SSEGateway;

declare global {
  /** Defined by <script src="sse-gateway.js">. */
  var SSEGateway: {
    connect: typeof connect;
    outcomeOf: typeof outcomeOf;
    GatewayStream: typeof GatewayStream;
    GatewayEvent: typeof GatewayEvent;
  };
}
