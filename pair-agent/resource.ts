/**
 * A resource the pair agent manages: started in order on the active node, stopped in reverse,
 * monitored while running. The replicated volume (promote/demote), the store agent, the
 * floating IP and OCF-style command resources all implement it.
 */
export type MonitorResult = 'running' | 'stopped' | 'failed';

export interface Resource {
  readonly name: string;
  /** Brings the resource up on this node. Throws (typed error) when it cannot. Idempotent. */
  start(): Promise<void>;
  /** Takes it down on this node; must succeed or throw before the peer may start it. Idempotent. */
  stop(): Promise<void>;
  monitor(): Promise<MonitorResult>;
}
