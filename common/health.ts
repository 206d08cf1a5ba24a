/**
 * The pair health record (ARCHITECTURE.md, "Redis bus"): what a pair-agent publishes every
 * second at `pairgate:pair:<id>:health` and serves at `/health`, and what proxies route on.
 */
import { z } from 'zod';

export const PAIR_STATES = ['ok', 'degraded', 'failing-over', 'down', 'maintenance'] as const;
export type PairState = (typeof PAIR_STATES)[number];

export const nodeHealthSchema = z.object({
  heartbeat: z.string(),
  role: z.string(),
  disk: z.string(),
});

export const healthRecordSchema = z.object({
  pair: z.string(),
  at: z.number(),
  state: z.enum(PAIR_STATES),
  primary: z.enum(['a', 'b']).nullable(),
  nodes: z.record(z.string(), nodeHealthSchema),
  replication: z.object({
    connection: z.string(),
    protocol: z.string(),
    outOfSyncBytes: z.number(),
  }),
  store: z.object({
    mailboxes: z.number(),
    messages: z.number(),
    bytesUsed: z.number(),
    bytesTotal: z.number(),
  }),
  sessions: z.object({
    imap: z.number(),
    pop3: z.number(),
    lmtp: z.number(),
  }),
  /** Optional extras (fencing outcome, service address); readers ignore what they do not know. */
  fencing: z.string().optional(),
  address: z.string().optional(),
});

export type HealthRecord = z.infer<typeof healthRecordSchema>;
export type NodeHealth = z.infer<typeof nodeHealthSchema>;

/** How long a record stays valid in Redis; a proxy treats a missing record as down. */
export const HEALTH_TTL_MS = 5000;
export const HEALTH_PUBLISH_INTERVAL_MS = 1000;

export function parseHealthRecord(text: string): HealthRecord | null {
  try {
    const r = healthRecordSchema.safeParse(JSON.parse(text));
    return r.success ? r.data : null;
  } catch {
    return null;
  }
}

/** Whether a pair in this state takes new sessions now. */
export function pairServes(state: PairState): boolean {
  return state === 'ok' || state === 'degraded';
}
