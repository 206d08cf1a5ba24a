/**
 * The heartbeat datagram: what one node tells its peer every keepalive, signed so that nothing
 * but the peer holding the shared key can move the membership.
 *
 *   "PGHB" | version (1 byte) | JSON body (UTF-8) | HMAC-SHA256 over everything before (32 bytes)
 *
 * The body carries the pair id, the sender's node id, its generation (a number fixed per process
 * start, growing across restarts) and a sequence number growing per datagram, plus the sender's
 * view of itself (state, role, disk, ping reachability, operator request). A pure module: the
 * socket side is heartbeat.ts.
 */
import { createHmac, timingSafeEqual } from 'node:crypto';
import { z } from 'zod';
import { NODE_STATES } from './state-machine.ts';

export const MAGIC = Buffer.from('PGHB', 'ascii');
export const VERSION = 1;
const MAC_LEN = 32;
const HEADER_LEN = MAGIC.length + 1;
/** Datagrams larger than this are refused before any parsing (a view is ~250 bytes). */
export const MAX_DATAGRAM = 1400;

export const nodeViewSchema = z
  .object({
    state: z.enum(NODE_STATES),
    /** Whether this node holds the resources now (it may be primary, taking over or releasing). */
    holds: z.boolean(),
    /** Disk state of the node's replica ("UpToDate", "Outdated", … or "none" without a volume). */
    disk: z.string().max(32),
    /** Reaches at least one ping target (true when none are configured). */
    ping: z.boolean(),
    /** An operator's standing request on this node. */
    request: z.enum(['none', 'standby', 'takeover']),
    /** Resources failed their monitor past the threshold on this node. */
    failed: z.boolean(),
    /**
     * A resource did not stop here (its stop failed or overran), so it may still run: the peer
     * fences this node before it takes over. Sent only while true, so that a peer of the release
     * before it (whose schema is strict) reads every other datagram as before.
     */
    unclean: z.literal(true).optional(),
  })
  .strict();

export type NodeView = z.infer<typeof nodeViewSchema>;

/** Who sent a datagram, and its place in the sender's sequence (ReplayGuard). */
const envelope = {
  pair: z.string().min(1).max(64),
  node: z.enum(['a', 'b']),
  gen: z.number().int().nonnegative(),
  seq: z.number().int().nonnegative(),
};

const bodySchema = z.object({ ...envelope, view: nodeViewSchema }).strict();

export type HeartbeatMessage = z.infer<typeof bodySchema>;

export type DropReason = 'short' | 'oversize' | 'bad-magic' | 'forged' | 'malformed' | 'unknown-node' | 'replay' | 'duplicate';

export type DecodeResult = { ok: true; message: HeartbeatMessage } | { ok: false; reason: DropReason };

function mac(key: Buffer, data: Buffer): Buffer {
  return createHmac('sha256', key).update(data).digest();
}

/** "PGHB" | version | JSON body | HMAC-SHA256 over everything before. */
function encodeFrame(key: Buffer, version: number, body: unknown): Buffer {
  const head = Buffer.concat([MAGIC, Buffer.from([version]), Buffer.from(JSON.stringify(body), 'utf8')]);
  return Buffer.concat([head, mac(key, head)]);
}

/**
 * Checks the frame and the signature, then the body against `schema` and the expected sender.
 * Says nothing about replays: that needs the receiver's memory of the peer's last generation and
 * sequence (ReplayGuard).
 */
function decodeFrame<T extends { pair: string; node: string }>(
  key: Buffer,
  data: Buffer,
  version: number,
  schema: z.ZodType<T>,
  expect: { pair: string; peer: 'a' | 'b' },
): { ok: true; message: T } | { ok: false; reason: DropReason } {
  if (data.length > MAX_DATAGRAM) return { ok: false, reason: 'oversize' };
  if (data.length < HEADER_LEN + 2 + MAC_LEN) return { ok: false, reason: 'short' };
  if (!data.subarray(0, MAGIC.length).equals(MAGIC) || data[MAGIC.length] !== version) return { ok: false, reason: 'bad-magic' };
  const head = data.subarray(0, data.length - MAC_LEN);
  if (!timingSafeEqual(data.subarray(data.length - MAC_LEN), mac(key, head))) return { ok: false, reason: 'forged' };
  let parsed: unknown;
  try {
    parsed = JSON.parse(head.subarray(HEADER_LEN).toString('utf8'));
  } catch {
    return { ok: false, reason: 'malformed' };
  }
  const body = schema.safeParse(parsed);
  if (!body.success) return { ok: false, reason: 'malformed' };
  if (body.data.pair !== expect.pair || body.data.node !== expect.peer) return { ok: false, reason: 'unknown-node' };
  return { ok: true, message: body.data };
}

export function encodeHeartbeat(key: Buffer, message: HeartbeatMessage): Buffer {
  return encodeFrame(key, VERSION, message);
}

export function decodeHeartbeat(key: Buffer, data: Buffer, expect: { pair: string; peer: 'a' | 'b' }): DecodeResult {
  return decodeFrame(key, data, VERSION, bodySchema, expect);
}

/**
 * A request to the peer, in a datagram of its own beside the view (same framing and signature,
 * version byte 2), so that a peer of a release without requests drops it as `bad-magic` and still
 * reads every view: for it nothing changes.
 *
 *   outdate: this node's volume is primary without a connected peer (it writes alone, and holds
 *            writes until the peer cannot be promoted with old data); the peer, if a secondary not
 *            connected either, marks its disk Outdated.
 */
export const REQUEST_VERSION = 2;
export const HEARTBEAT_REQUESTS = ['outdate'] as const;
export type HeartbeatRequest = (typeof HEARTBEAT_REQUESTS)[number];

const requestSchema = z.object({ ...envelope, request: z.enum(HEARTBEAT_REQUESTS) }).strict();

export type RequestMessage = z.infer<typeof requestSchema>;

export function encodeRequest(key: Buffer, message: RequestMessage): Buffer {
  return encodeFrame(key, REQUEST_VERSION, message);
}

/** Whether `data` claims to be a request datagram (decodeRequest checks it). */
export function isRequestDatagram(data: Buffer): boolean {
  return data.length > HEADER_LEN && data.subarray(0, MAGIC.length).equals(MAGIC) && data[MAGIC.length] === REQUEST_VERSION;
}

export function decodeRequest(key: Buffer, data: Buffer, expect: { pair: string; peer: 'a' | 'b' }): { ok: true; message: RequestMessage } | { ok: false; reason: DropReason } {
  return decodeFrame(key, data, REQUEST_VERSION, requestSchema, expect);
}

/**
 * Remembers the peer's newest (generation, sequence). A datagram from an older generation, or
 * with a sequence at or below the last one of the same generation, is a replay (or, for the
 * same sequence arriving over a second link, a duplicate) and must not touch the membership.
 */
export class ReplayGuard {
  private gen = -1;
  private seq = -1;

  check(message: Pick<HeartbeatMessage, 'gen' | 'seq'>): { ok: true; restarted: boolean } | { ok: false; reason: 'replay' | 'duplicate' } {
    if (message.gen < this.gen) return { ok: false, reason: 'replay' };
    if (message.gen === this.gen) {
      if (message.seq === this.seq) return { ok: false, reason: 'duplicate' };
      if (message.seq < this.seq) return { ok: false, reason: 'replay' };
      this.seq = message.seq;
      return { ok: true, restarted: false };
    }
    const restarted = this.gen !== -1;
    this.gen = message.gen;
    this.seq = message.seq;
    return { ok: true, restarted };
  }

  get generation(): number {
    return this.gen;
  }
}
