// Types for react.mjs (the package's "sse-gateway-client/react").
import type {
  ApprovalState,
  ConnectOptions,
  Decision,
  GatewayError,
  GatewayEvent,
  GatewayStream,
  InputKind,
  Message,
  InputSent,
  Outcome,
  SendOptions,
  StreamState,
} from "./sse-gateway.js";

/** What the default reducer keeps of each event when no `reduce` is given. */
export interface EventEntry {
  id: number;
  type: string;
  cursor: string;
  /** Parsed JSON, or the text when it is not JSON. */
  data: any;
}

export interface SessionOptions<V> extends ConnectOptions<V> {
  /** The stream URL; null or undefined: no stream (status "idle"). */
  url?: string | URL | null;
}

export interface SessionSnapshot<V> {
  /** The reduced view, or the list of events without `reduce`. */
  view: V;
  status: StreamState | "idle";
  /** gateway.end's data, the run's result, once it ended (undefined before). */
  result: any;
  /** How the run ended, {status, result, error}, once it did (undefined before). */
  outcome: Outcome | undefined;
  ended: boolean;
  error: GatewayError | null;
  cursor: string | null;
  stream: GatewayStream<V> | null;
  /** The approvals the agent asked for, by id (decision null while open). */
  approvals: Record<string, ApprovalState>;
  /** The session's messages, assembled, in the order they began (a new array on each change). */
  messages: readonly Message[];
  /** The stream's return path (they reject with code "no_stream" before it opens). */
  send: (kind: InputKind, data?: any, options?: SendOptions) => Promise<InputSent>;
  cancel: (reason?: string, options?: SendOptions) => Promise<InputSent>;
  approve: (approvalId: string, decision?: Decision, data?: any, options?: SendOptions) => Promise<InputSent>;
}

export declare function appendEvent(list: EventEntry[], event: GatewayEvent): EventEntry[];

export declare function useGatewaySession<V>(
  options: SessionOptions<V> & { reduce: (view: V, event: GatewayEvent) => V },
): SessionSnapshot<V>;
export declare function useGatewaySession(options: SessionOptions<EventEntry[]>): SessionSnapshot<EventEntry[]>;

export default useGatewaySession;
