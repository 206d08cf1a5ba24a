/**
 * The log-structured mail store: the MailStore contract on a BlockDevice.
 *
 * Changes are laid out as records at once (synchronously, so each method's validation,
 * index update and append are atomic with respect to the others), then committed in groups;
 * a method resolves only after its records are durable. Bodies are stored once per content
 * (SHA-256) and reference counted; checkpoints of the indexes bound the replay on open;
 * compaction copies live bodies out of sparse segments so that they can be reused.
 */
import { createHash, randomBytes } from 'node:crypto';
import { sha256Hex } from './digest.ts';
import { EventEmitter } from 'node:events';
import { LRUCache } from 'lru-cache';
import type { Logger } from '../../common/log.ts';
import { gauge, type MetricsRegistry } from '../../common/metrics.ts';
import { BadInputError, ConflictError, IntegrityError, LimitError, NotFoundError, UnavailableError } from '../../common/errors.ts';
import { BLOCK_SIZE, type BlockDevice } from '../volume/block-device.ts';
import {
  chooseGeometry,
  DATA_START,
  decodeSuperblock,
  encodeSuperblock,
  HEADER_SIZE,
  LogWriter,
  parseHeader,
  RecordType,
  roundUp,
  scanLog,
  segmentOf,
  segmentStart,
  verifyRecord,
  type Geometry,
  type LogPosition,
  type ReadStop,
  type Superblock,
} from './log.ts';
import { StoreState, type Body, type BodyChunk, type Mailbox, type Op, type User } from './state.ts';
import { checkMailbox, checkUser, DEFAULT_MAILBOXES, normalizeFlags } from './names.ts';
import type {
  BodyData,
  DeliveryRecipientResult,
  Flag,
  MailboxInfo,
  MailStore,
  MessageMeta,
  SpecialUse,
  StoreChange,
  StoreStats,
} from './types.ts';

export interface OpenStoreOptions {
  log: Logger;
  registry?: MetricsRegistry | undefined;
  /** Per-user quota in bytes (sum of message sizes); unlimited when unset. */
  quotaBytes?: number | undefined;
  /** A per-user limit (e.g. from an LDAP attribute); `undefined` falls back to `quotaBytes`, `null` = unlimited. */
  quotaFor?: ((user: string) => number | null | undefined) | undefined;
  /** Byte bound of the body read cache (default 64 MiB). */
  cacheBytes?: number | undefined;
  /** Write a fresh, empty store (destroys what was there). A blank device is formatted anyway. */
  format?: boolean | undefined;
  /** Open without writing anything (check, stats on a copy or a secondary). */
  readOnly?: boolean | undefined;
  /** Log bytes between checkpoints (default: an eighth of the volume, 8..256 MiB). */
  checkpointBytes?: number | undefined;
  /** Background compaction: I/O bound in bytes per second (default 32 MiB/s); 0 turns it off. */
  compactBytesPerSec?: number | undefined;
  /** Background compaction check interval (default 10 s). */
  compactIntervalMs?: number | undefined;
}

export interface RecoveryReport {
  checkpoint: LogPosition | null;
  usedFallbackCheckpoint: boolean;
  replayedRecords: number;
  replayedBytes: number;
  stop: ReadStop;
  stopDetail?: string | undefined;
  truncatedAt: number | null;
  droppedBodies: number;
  problems: string[];
  ms: number;
}

export interface CheckReport {
  ok: boolean;
  records: number;
  bodies: number;
  bodyBytes: number;
  messages: number;
  problems: string[];
  /** Expected findings (where the log ended, what was truncated). */
  notes: string[];
  recovery: RecoveryReport;
}

export interface CompactResult {
  segmentsFreed: number;
  bodiesMoved: number;
  bytesMoved: number;
}

/** Largest body kept in the read cache when it is written (see cacheOnWrite). */
export const CACHE_ON_WRITE_MAX = 256 * 1024;

const SHA_LEN = 32;
const BODY_HDR = SHA_LEN + 12;

interface Registered {
  store: LogStore | null;
}
const byRegistry = new WeakMap<MetricsRegistry, Registered>();

function registerMetrics(registry: MetricsRegistry, store: LogStore): void {
  let reg = byRegistry.get(registry);
  if (!reg) {
    const r: Registered = { store: null };
    reg = r;
    byRegistry.set(registry, r);
    const g = (name: string, help: string, pick: (s: LogStore) => number) =>
      gauge(registry, name, help, [], function () {
        if (r.store && !r.store.closed) this.set(pick(r.store));
      });
    g('store_bytes_used', 'Bytes of the store volume in use (live and not yet reclaimed records).', (s) => s.bytesUsedNow());
    g('store_bytes_total', 'Size of the store volume in bytes.', (s) => s.device.size);
    g('store_mailboxes', 'Mailboxes in the store.', (s) => s.counts().mailboxes);
    g('store_messages', 'Messages in the store (each mailbox entry counted).', (s) => s.counts().messages);
  }
  reg.store = store;
}


export class LogStore extends EventEmitter implements MailStore {
  closed = false;
  private readonly log: Logger;
  private readonly cache: LRUCache<string, Buffer>;
  private readonly pendingBodies = new Map<string, readonly Buffer[]>();
  private readonly live: Float64Array;
  private readonly chain: number[] = [];
  private readonly inChain = new Set<number>();
  private lastCheckpointAt = 0;
  private checkpointing: Promise<void> | null = null;
  private compacting: Promise<CompactResult> | null = null;
  private compactTimer: NodeJS.Timeout | null = null;
  private readonly checkpointBytes: number;
  private readonly cacheWriteLimit: number;
  recovery!: RecoveryReport;
  private writer!: LogWriter;

  private constructor(
    readonly device: BlockDevice,
    private sb: Superblock,
    private state: StoreState,
    readonly g: Geometry,
    private readonly opts: OpenStoreOptions,
  ) {
    super();
    this.setMaxListeners(0);
    this.log = opts.log.child({ component: 'store' });
    this.cache = new LRUCache<string, Buffer>({ maxSize: Math.max(1, opts.cacheBytes ?? 64 * 1024 * 1024), sizeCalculation: (b) => Math.max(1, b.length) });
    this.live = new Float64Array(g.segmentCount);
    this.cacheWriteLimit = Math.min(CACHE_ON_WRITE_MAX, Math.floor((opts.cacheBytes ?? 64 * 1024 * 1024) / 16));
    const vol = g.segmentSize * g.segmentCount;
    this.checkpointBytes = opts.checkpointBytes ?? Math.min(256 * 1024 * 1024, Math.max(8 * 1024 * 1024, Math.floor(vol / 8)));
  }

  // ------------------------------------------------------------------ open / recovery

  static async open(device: BlockDevice, opts: OpenStoreOptions): Promise<LogStore> {
    const started = Date.now();
    if (device.size < DATA_START + 4 * 64 * 1024) throw new LimitError(`volume of ${device.size} bytes is too small for the store`);
    const head = await device.read(0, 2 * BLOCK_SIZE);
    const copies = [decodeSuperblock(head.subarray(0, BLOCK_SIZE)), decodeSuperblock(head.subarray(BLOCK_SIZE))];
    let sb = copies.filter((s): s is Superblock => s !== null).sort((a, b) => b.generation - a.generation)[0];
    const log = opts.log.child({ component: 'store' });
    if (!sb || opts.format) {
      if (!sb && !opts.format && !head.every((b) => b === 0)) {
        throw new IntegrityError('no valid store superblock on the volume (not a pairgate store, or both copies damaged); to start over, `pairgate store format --volume FILE --yes` (destructive)');
      }
      if (opts.readOnly) throw new IntegrityError('volume holds no store and is opened read-only');
      sb = await LogStore.format(device);
      log.info({ volumeId: sb.volumeId, segments: sb.segmentCount, segmentSize: sb.segmentSize }, 'formatted a new store volume');
    }
    const g: Geometry = { segmentSize: sb.segmentSize, segmentCount: sb.segmentCount };
    if (DATA_START + g.segmentSize * g.segmentCount > device.size) throw new IntegrityError('store superblock describes more segments than the volume holds');

    // Find a checkpoint that reads back whole; fall back to the previous one.
    const tries: Array<LogPosition | null> = [];
    if (sb.checkpoint) tries.push(sb.checkpoint);
    if (sb.prevCheckpoint) tries.push(sb.prevCheckpoint);
    if (!sb.checkpoint) tries.push(null);
    let lastErr: unknown = null;
    for (let i = 0; i < tries.length; i++) {
      try {
        const store = await LogStore.recover(device, sb, g, opts, tries[i]!, i > 0, started);
        return store;
      } catch (err) {
        lastErr = err;
        if (!(err instanceof IntegrityError)) throw err;
        log.error({ err: err.message, checkpoint: tries[i] }, 'checkpoint unreadable, trying the previous one');
      }
    }
    throw lastErr instanceof Error ? lastErr : new IntegrityError('store could not be recovered');
  }

  static async format(device: BlockDevice): Promise<Superblock> {
    const g = chooseGeometry(device.size);
    const seed = randomBytes(4).readUInt32LE(0);
    const sb: Superblock = {
      version: 1,
      generation: 2,
      volumeId: randomBytes(16).toString('hex'),
      createdAt: Date.now(),
      segmentSize: g.segmentSize,
      segmentCount: g.segmentCount,
      logStart: { offset: segmentStart(g, 0), seq: 1, prevCrc: seed },
      checkpoint: null,
      prevCheckpoint: null,
    };
    await device.write(segmentStart(g, 0), Buffer.alloc(BLOCK_SIZE));
    await device.write(BLOCK_SIZE, encodeSuperblock({ ...sb, generation: 1 }));
    await device.write(0, encodeSuperblock(sb));
    await device.flush();
    return sb;
  }

  private static async recover(
    device: BlockDevice,
    sb: Superblock,
    g: Geometry,
    opts: OpenStoreOptions,
    checkpoint: LogPosition | null,
    fallback: boolean,
    started: number,
  ): Promise<LogStore> {
    const start = checkpoint ?? sb.logStart;
    const result: { end: LogPosition; stop: ReadStop; detail?: string; skipped?: string[] } = { end: start, stop: 'end' };
    const entered: number[] = [];
    const it = scanLog(device, g, start, result, (s) => entered.push(s));
    let state = new StoreState();
    let chainFromSnapshot: number[] = [];
    const problems: string[] = [];
    let records = 0;
    let bytes = 0;
    if (checkpoint) {
      const parts: Buffer[] = [];
      let count = -1;
      while (count < 0 || parts.length < count) {
        const n = await it.next();
        if (n.done) throw new IntegrityError(`checkpoint at ${checkpoint.offset} is incomplete (${result.stop}: ${result.detail ?? ''})`);
        const r = n.value;
        if (r.type === RecordType.SEG_END) continue;
        if (r.type !== RecordType.CKPT) throw new IntegrityError(`checkpoint at ${checkpoint.offset}: unexpected record type ${r.type}`);
        const idx = r.payload.readUInt32LE(0);
        const cnt = r.payload.readUInt32LE(4);
        if (count < 0) count = cnt;
        if (idx !== parts.length || cnt !== count) throw new IntegrityError(`checkpoint at ${checkpoint.offset}: chunk ${idx}/${cnt} out of order`);
        parts.push(r.payload.subarray(8));
        records++;
        bytes += r.length;
      }
      try {
        const snap = StoreState.fromSnapshot(Buffer.concat(parts));
        state = snap.state;
        chainFromSnapshot = Array.isArray(snap.extra.chain) ? (snap.extra.chain as number[]) : [];
        problems.push(...state.problems);
        state.problems = [];
      } catch (err) {
        throw new IntegrityError(`checkpoint at ${checkpoint.offset} does not parse`, { cause: err });
      }
    }
    for await (const r of it) {
      records++;
      bytes += r.length;
      applyRecord(state, r.type, r.payload, r.offset, r.length, problems);
    }
    problems.push(...state.problems, ...(result.skipped ?? []));
    state.problems = [];
    const dropped = state.dropUnreferenced();
    const store = new LogStore(device, sb, state, g, opts);
    // The segments the recovery may need again: from the snapshot's chain, then the ones replayed.
    for (const s of [...chainFromSnapshot, ...entered]) store.enterSegment(s);
    store.recomputeLive();
    store.state.onBodyDead = (id, b) => store.bodyDead(id, b);
    let truncatedAt: number | null = null;
    const end = result.end;
    if (!opts.readOnly) {
      // Truncate: zero the rest of the block the log ends in, so the next record lands where replay looks.
      const blockStart = end.offset - (end.offset % BLOCK_SIZE);
      if (end.offset % BLOCK_SIZE !== 0 || result.stop !== 'end') {
        const blk = await device.read(blockStart, BLOCK_SIZE);
        const tail = blk.subarray(end.offset - blockStart);
        if (!tail.every((b) => b === 0)) {
          tail.fill(0);
          await device.write(blockStart, blk);
          truncatedAt = end.offset;
        }
      }
    }
    const endOffset = end.offset % BLOCK_SIZE === 0 ? end.offset : roundUp(end.offset);
    store.writer = new LogWriter(device, g, { ...end, offset: endOffset }, () => store.pickSegment(), (s) => store.enterSegment(s));
    if (endOffset !== end.offset) store.writer.pos.offset = endOffset;
    store.recovery = {
      checkpoint,
      usedFallbackCheckpoint: fallback,
      replayedRecords: records,
      replayedBytes: bytes,
      stop: result.stop,
      stopDetail: result.detail,
      truncatedAt,
      droppedBodies: dropped.length,
      problems,
      ms: Date.now() - started,
    };
    const lvl = result.stop === 'bad-crc' || problems.length || fallback ? 'warn' : 'info';
    store.log[lvl](
      { records, bytes, stop: result.stop, detail: result.detail, truncatedAt, droppedBodies: dropped.length, problems: problems.slice(0, 20), fallback, ms: store.recovery.ms },
      truncatedAt !== null ? 'store recovered; log truncated at the first bad record' : 'store recovered',
    );
    if (opts.registry) registerMetrics(opts.registry, store);
    if (!opts.readOnly && (opts.compactBytesPerSec ?? 1) > 0) {
      store.compactTimer = setInterval(() => store.backgroundCompact(), opts.compactIntervalMs ?? 10_000);
      store.compactTimer.unref();
    }
    return store;
  }

  // ------------------------------------------------------------------ segments

  private enterSegment(seg: number): void {
    if (this.inChain.has(seg)) return;
    this.inChain.add(seg);
    this.chain.push(seg);
  }

  private recomputeLive(): void {
    this.live.fill(0);
    for (const b of this.state.bodies.values()) for (const c of b.chunks) if (c) this.live[segmentOf(this.g, c.offset)]! += c.length;
  }

  private bodyDead(id: string, b: Body): void {
    this.cache.delete(id);
    for (const c of b.chunks) if (c) this.live[segmentOf(this.g, c.offset)]! -= c.length;
  }

  private isFree(seg: number): boolean {
    return !this.inChain.has(seg) && this.live[seg]! <= 0;
  }

  freeSegments(): number {
    let n = 0;
    for (let i = 0; i < this.g.segmentCount; i++) if (this.isFree(i)) n++;
    return n;
  }

  private pickSegment(): number | null {
    const cur = this.writer ? this.writer.seg : 0;
    for (let k = 1; k <= this.g.segmentCount; k++) {
      const s = (cur + k) % this.g.segmentCount;
      if (this.isFree(s)) return s;
    }
    return null;
  }

  /** Refuses a change that would not fit, keeping two segments for checkpoints and compaction. */
  private reserve(bytes: number, system = false): void {
    const room = this.writer.roomInSegment();
    if (bytes <= room) return;
    const per = this.g.segmentSize - 2 * BLOCK_SIZE;
    const spare = this.freeSegments() - (system ? 0 : 2);
    if (spare * per + room >= bytes + HEADER_SIZE * 8) return;
    // Not from here directly: reserve() runs inside checkpoint and compaction too.
    setImmediate(() => this.backgroundCompact(true));
    throw new LimitError('store volume is full', { temporary: true });
  }

  bytesUsedNow(): number {
    let used = DATA_START;
    for (let s = 0; s < this.g.segmentCount; s++) {
      if (this.inChain.has(s)) {
        used += s === this.writer.seg ? this.writer.pos.offset - segmentStart(this.g, s) : this.g.segmentSize;
      } else used += Math.max(0, this.live[s]!);
    }
    return used;
  }

  counts(): { mailboxes: number; messages: number; bodyBytes: number; bodies: number } {
    let mailboxes = 0;
    let messages = 0;
    for (const u of this.state.users.values()) {
      mailboxes += u.mailboxes.size;
      for (const mb of u.mailboxes.values()) messages += mb.msgs.size;
    }
    let bodyBytes = 0;
    for (const b of this.state.bodies.values()) bodyBytes += b.size;
    return { mailboxes, messages, bodyBytes, bodies: this.state.bodies.size };
  }

  // ------------------------------------------------------------------ appending

  private assertWritable(): void {
    if (this.closed) throw new UnavailableError('mail store is closed');
    if (this.opts.readOnly) throw new UnavailableError('mail store is open read-only');
    if (!this.device.writable) throw new UnavailableError('store volume is not writable here (not primary)');
    if (this.writer.failed) throw new UnavailableError('store log failed a write; the store must be reopened', { cause: this.writer.failed });
  }

  private assertOpen(): void {
    if (this.closed) throw new UnavailableError('mail store is closed');
  }

  private appendOp(op: Op): void {
    this.writer.append(RecordType.OP, Buffer.from(JSON.stringify(op)));
    this.state.apply(op);
  }

  private bodyRecordsSize(size: number): number {
    const chunk = this.chunkSize();
    const n = Math.max(1, Math.ceil(size / chunk));
    return size + n * (HEADER_SIZE + BODY_HDR) + 2 * BLOCK_SIZE;
  }

  private chunkSize(): number {
    return Math.min(1024 * 1024, this.writer.maxRecord - HEADER_SIZE - BODY_HDR - BLOCK_SIZE);
  }

  /**
   * Appends BODY records for a body given as parts (new body or a compaction move) and indexes
   * them. The parts go to the log by reference (sliced at record boundaries, never joined).
   */
  private appendBody(id: string, data: readonly Buffer[], size: number): void {
    const sha = Buffer.from(id, 'hex');
    const chunk = this.chunkSize();
    const count = Math.max(1, Math.ceil(size / chunk));
    for (let i = 0; i < count; i++) {
      const h = Buffer.allocUnsafe(BODY_HDR);
      sha.copy(h, 0);
      h.writeUInt32LE(i, SHA_LEN);
      h.writeUInt32LE(count, SHA_LEN + 4);
      h.writeUInt32LE(size, SHA_LEN + 8);
      const rec = this.writer.append(RecordType.BODY, [h, ...sliceParts(data, i * chunk, Math.min(size, (i + 1) * chunk))]);
      const c: BodyChunk = { offset: rec.offset, length: rec.length };
      const { moved } = this.state.bodyChunk(id, i, count, size, c);
      if (moved) this.live[segmentOf(this.g, moved.offset)]! -= moved.length;
      this.live[segmentOf(this.g, c.offset)]! += c.length;
    }
  }

  /**
   * Keeps a freshly delivered body in the read cache (new mail is the mail read next: POP3 polls,
   * IMAP IDLE fetches). Only bodies up to cacheWriteLimit: a large body kept on the chance of a
   * read outlives the young generation, and at delivery rates that old-space garbage (1 MiB per
   * 1 MiB delivery) made V8 run a full mark-compact every few deliveries, a cost that grows with
   * the in-memory index (bench/store: 15-30% of the store's busy time). A large body read later
   * is read from the log and cached then.
   */
  private cacheOnWrite(id: string, parts: readonly Buffer[], size: number): void {
    if (size > this.cacheWriteLimit) return;
    // Always a copy: the caller may reuse its buffers once deliver() has resolved (see BodyData).
    this.cache.set(id, Buffer.concat(parts, size));
  }

  /** Waits for durability, then emits the changes and maybe starts a checkpoint. */
  private async commit(changes: StoreChange[] = []): Promise<void> {
    await this.writer.commit();
    for (const c of changes) this.emit('change', c);
    if (!this.checkpointing && this.writer.bytesAppended - this.lastCheckpointAt > this.checkpointBytes && !this.closed) {
      this.checkpoint().catch((err: unknown) => this.log.error({ err }, 'checkpoint failed'));
    }
  }

  private storeBody(id: string): { id: string; fresh: boolean } {
    return { id, fresh: !this.state.bodies.has(id) };
  }

  /** The user's byte limit: `quotaFor(user)` (e.g. an LDAP attribute) when it answers, else `quotaBytes`. */
  private limitFor(user: string): number | null {
    const own = this.opts.quotaFor?.(user);
    return own !== undefined ? own : (this.opts.quotaBytes ?? null);
  }

  private quotaCheck(user: string, u: User | undefined, extra: number): void {
    const limit = this.limitFor(user);
    if (limit === undefined || limit === null) return;
    const used = u?.usedBytes ?? 0;
    if (used + extra > limit) throw new LimitError(`mailbox full: quota of ${limit} bytes exceeded`, { details: { used, extra, limit } });
  }

  /** Appends the ops that create the user's default mailboxes (sync). */
  private ensureUserSync(user: string): boolean {
    const u = this.state.user(user);
    let created = false;
    for (const d of DEFAULT_MAILBOXES) {
      if (u?.mailboxes.has(d.name) || (u && d.name !== 'INBOX' && u.mailboxes.has('INBOX'))) continue;
      const op: Op = { op: 'mbox', user, name: d.name, uv: this.state.nextUidValidity, sub: true };
      if (d.specialUse) op.special = d.specialUse;
      this.appendOp(op);
      created = true;
    }
    return created;
  }

  private mailbox(user: string, name: string): { u: User; mb: Mailbox } {
    const u = this.state.user(checkUser(user));
    const mb = u?.mailboxes.get(checkMailbox(name));
    if (!u || !mb) throw new NotFoundError(`no mailbox ${name}`);
    return { u, mb };
  }

  // ------------------------------------------------------------------ MailStore

  async deliver(deliveryId: string, users: string[], given: BodyData, opts: { internalDate?: number; bodySha256?: string } = {}): Promise<DeliveryRecipientResult[]> {
    this.assertWritable();
    if (typeof deliveryId !== 'string' || !deliveryId || deliveryId.length > 256) throw new BadInputError('invalid delivery id');
    if (opts.bodySha256 !== undefined && !/^[0-9a-f]{64}$/.test(opts.bodySha256)) throw new BadInputError('invalid body digest');
    const parts: readonly Buffer[] = Buffer.isBuffer(given) ? [given] : given;
    const size = partsLength(parts);
    const bodyId = opts.bodySha256 ?? (parts.length === 1 ? await sha256Hex(parts[0]!) : sha256OfParts(parts));
    // From here to the append, synchronous: validation, index update and log records are one step.
    this.assertWritable();
    const date = opts.internalDate ?? Date.now();
    const prior = this.state.deliveries.get(deliveryId);
    const results: DeliveryRecipientResult[] = [];
    const to: Array<[string, number, number]> = [];
    const changes: StoreChange[] = [];
    const seen = new Set<string>();
    let anyNew = false;
    const { id, fresh } = this.storeBody(bodyId);
    for (const user of users) {
      try {
        checkUser(user);
        if (seen.has(user)) {
          results.push({ ...results.find((r) => r.user === user)! });
          continue;
        }
        seen.add(user);
        const uidBefore = prior?.users[user];
        if (uidBefore !== undefined) {
          results.push({ user, ok: true, uid: uidBefore, duplicate: true });
          continue;
        }
        this.quotaCheck(user, this.state.user(user), size);
        results.push({ user, ok: true });
        anyNew = true;
      } catch (err) {
        results.push({ user, ok: false, error: err instanceof Error ? err : new Error(String(err)) });
      }
    }
    if (anyNew) {
      this.reserve((fresh ? this.bodyRecordsSize(size) : 0) + 512 + users.length * 64 + DEFAULT_MAILBOXES.length * 128 * users.length);
      for (const r of results) if (r.ok && !r.duplicate && r.uid === undefined) this.ensureUserSync(r.user);
      if (fresh && !this.state.bodies.has(id)) {
        this.appendBody(id, parts, size);
        this.pendingBodies.set(id, parts);
      }
      const assigned = new Map<string, number>();
      for (const r of results) {
        if (!r.ok || r.duplicate || r.uid !== undefined) continue;
        if (assigned.has(r.user)) {
          r.uid = assigned.get(r.user)!;
          continue;
        }
        const mb = this.state.user(r.user)!.mailboxes.get('INBOX')!;
        const uid = mb.uidNext;
        const modseq = mb.highestModseq + 1;
        to.push([r.user, uid, modseq]);
        assigned.set(r.user, uid);
        r.uid = uid;
        changes.push({ user: r.user, mailbox: 'INBOX', kind: 'exists', uids: [uid], modseq });
      }
      this.appendOp({ op: 'dlv', id: deliveryId, body: id, size, date, to, ...(opts.internalDate !== undefined ? { at: Date.now() } : {}) });
    }
    try {
      await this.commit(changes);
      // New mail is the mail read next (POP3 polls, IMAP IDLE fetches): keep modest bodies in the read cache.
      if (anyNew && fresh) this.cacheOnWrite(id, parts, size);
    } finally {
      if (anyNew) this.pendingBodies.delete(id);
    }
    return results;
  }

  async ensureUser(user: string): Promise<void> {
    this.assertOpen();
    checkUser(user);
    const u = this.state.user(user);
    if (u?.mailboxes.has('INBOX')) return;
    this.assertWritable();
    this.reserve(4096);
    if (this.ensureUserSync(user)) await this.commit([{ user, mailbox: '', kind: 'mailboxes', uids: [], modseq: 0 }]);
    else await this.writer.commit();
  }

  private info(u: User, mb: Mailbox): MailboxInfo {
    let unseen = 0;
    for (const m of mb.msgs.values()) if (!m.flags.includes('\\Seen')) unseen++;
    return {
      name: mb.name,
      uidValidity: mb.uidValidity,
      uidNext: mb.uidNext,
      highestModseq: mb.highestModseq,
      messages: mb.msgs.size,
      unseen,
      specialUse: mb.specialUse,
      subscribed: u.subscriptions.has(mb.name),
    };
  }

  async listMailboxes(user: string): Promise<MailboxInfo[]> {
    this.assertOpen();
    const u = this.state.user(checkUser(user));
    if (!u) return [];
    return [...u.mailboxes.values()]
      .map((mb) => this.info(u, mb))
      .sort((a, b) => (a.name === 'INBOX' ? -1 : b.name === 'INBOX' ? 1 : a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  async mailboxInfo(user: string, mailbox: string): Promise<MailboxInfo> {
    this.assertOpen();
    const { u, mb } = this.mailbox(user, mailbox);
    return this.info(u, mb);
  }

  async createMailbox(user: string, mailbox: string, opts: { specialUse?: SpecialUse } = {}): Promise<MailboxInfo> {
    this.assertWritable();
    checkUser(user);
    const name = checkMailbox(mailbox);
    this.reserve(8192);
    this.ensureUserSync(user);
    const u = this.state.user(user)!;
    if (u.mailboxes.has(name)) {
      await this.writer.commit();
      throw new ConflictError(`Mailbox already exists: ${name}`);
    }
    const op: Op = { op: 'mbox', user, name, uv: this.state.nextUidValidity };
    if (opts.specialUse) op.special = opts.specialUse;
    this.appendOp(op);
    const mb = u.mailboxes.get(name)!;
    await this.commit([{ user, mailbox: name, kind: 'mailboxes', uids: [], modseq: mb.highestModseq }]);
    return this.info(u, mb);
  }

  async deleteMailbox(user: string, mailbox: string): Promise<void> {
    this.assertWritable();
    const { mb } = this.mailbox(user, mailbox);
    if (mb.name === 'INBOX') throw new BadInputError('INBOX cannot be deleted');
    const uids = [...mb.msgs.keys()];
    this.reserve(1024);
    this.appendOp({ op: 'mdel', user, name: mb.name });
    const changes: StoreChange[] = [];
    if (uids.length) changes.push({ user, mailbox: mb.name, kind: 'expunge', uids, modseq: mb.highestModseq + 1 });
    changes.push({ user, mailbox: mb.name, kind: 'mailboxes', uids: [], modseq: 0 });
    await this.commit(changes);
  }

  async renameMailbox(user: string, from: string, to: string): Promise<void> {
    this.assertWritable();
    const { u, mb } = this.mailbox(user, from);
    const target = checkMailbox(to);
    if (mb.name === 'INBOX') throw new BadInputError('renaming INBOX is not supported');
    if (target === 'INBOX' || u.mailboxes.has(target)) throw new ConflictError(`Mailbox already exists: ${target}`);
    this.reserve(1024);
    const old = mb.name;
    this.appendOp({ op: 'mren', user, from: old, to: target });
    await this.commit([
      { user, mailbox: old, kind: 'mailboxes', uids: [], modseq: 0 },
      { user, mailbox: target, kind: 'mailboxes', uids: [], modseq: 0 },
    ]);
  }

  async setSubscribed(user: string, mailbox: string, subscribed: boolean): Promise<void> {
    this.assertWritable();
    checkUser(user);
    const name = checkMailbox(mailbox);
    const u = this.state.user(user);
    if ((u?.subscriptions.has(name) ?? false) === subscribed) return;
    this.reserve(1024);
    this.appendOp({ op: 'sub', user, name, v: subscribed });
    await this.commit([{ user, mailbox: name, kind: 'mailboxes', uids: [], modseq: 0 }]);
  }

  async listMessages(user: string, mailbox: string): Promise<MessageMeta[]> {
    this.assertOpen();
    const { mb } = this.mailbox(user, mailbox);
    const out: MessageMeta[] = [];
    for (const m of mb.msgs.values()) out.push({ uid: m.uid, size: m.size, internalDate: m.date, flags: [...m.flags], modseq: m.modseq, bodyId: m.body });
    return out;
  }

  async readMessage(bodyId: string): Promise<Buffer> {
    this.assertOpen();
    for (let attempt = 0; ; attempt++) {
      // Bodies whose records are not durable yet (new, or being moved by compaction) are served from memory.
      const hit = this.cache.get(bodyId);
      if (hit) return hit;
      const pending = this.pendingBodies.get(bodyId);
      // A copy: a pending body is the deliverer's buffers, which it reuses once deliver() resolves.
      if (pending) return Buffer.concat(pending);
      const b = this.state.bodies.get(bodyId);
      if (!b) throw new NotFoundError(`no message body ${String(bodyId).slice(0, 80)}`);
      const chunks = [...b.chunks];
      try {
        const data = await this.readBody(bodyId, b, attempt === 0);
        this.cache.set(bodyId, data);
        return data;
      } catch (err) {
        // Expunged or moved by compaction while we read (its old space reused): not damage.
        const now = this.state.bodies.get(bodyId);
        if (!now) throw new NotFoundError(`message body ${bodyId} was removed`);
        const moved = now.chunks.length !== chunks.length || now.chunks.some((c, i) => c?.offset !== chunks[i]?.offset);
        if (!(err instanceof IntegrityError) || !moved || attempt > 0) {
          if (err instanceof IntegrityError) this.log.error({ body: bodyId, err: err.message }, 'stored body fails its checksum');
          throw err;
        }
      }
    }
  }

  /** Reads and verifies a body from its records (CRC per record, SHA-256 of the whole). */
  private async readBody(id: string, b: Body, _quiet = false): Promise<Buffer> {
    const parts: Buffer[] = [];
    const chunks = [...b.chunks];
    for (let i = 0; i < chunks.length; i++) {
      const c = chunks[i];
      if (!c) throw new IntegrityError(`body ${id}: chunk ${i} missing`);
      const raw = await this.device.read(c.offset, c.length);
      const h = parseHeader(raw, 0);
      const payload = h && h.type === RecordType.BODY ? verifyRecord(raw, 0, h) : null;
      if (!payload || payload.subarray(0, SHA_LEN).toString('hex') !== id || payload.readUInt32LE(SHA_LEN) !== i) {
        throw new IntegrityError(`body ${id}: record at ${c.offset} is damaged`);
      }
      parts.push(payload.subarray(BODY_HDR));
    }
    const data = Buffer.concat(parts);
    if (data.length !== b.size || (await sha256Hex(data)) !== id) {
      throw new IntegrityError(`body ${id} fails its SHA-256`);
    }
    return data;
  }

  async append(user: string, mailbox: string, body: Buffer, opts: { flags?: Flag[]; internalDate?: number } = {}): Promise<{ uid: number; uidValidity: number }> {
    this.assertWritable();
    const bodyId = await sha256Hex(body);
    this.assertWritable();
    const { u, mb } = this.mailbox(user, mailbox);
    const flags = normalizeFlags(opts.flags ?? []);
    this.quotaCheck(u.name, u, body.length);
    const { id, fresh } = this.storeBody(bodyId);
    this.reserve((fresh ? this.bodyRecordsSize(body.length) : 0) + 1024);
    if (fresh) {
      this.appendBody(id, [body], body.length);
      this.pendingBodies.set(id, [body]);
    }
    const uid = mb.uidNext;
    const modseq = mb.highestModseq + 1;
    this.appendOp({ op: 'add', user: u.name, mbox: mb.name, uid, body: id, size: body.length, date: opts.internalDate ?? Date.now(), flags, modseq });
    try {
      await this.commit([{ user: u.name, mailbox: mb.name, kind: 'exists', uids: [uid], modseq }]);
    } finally {
      if (fresh) this.pendingBodies.delete(id);
    }
    return { uid, uidValidity: mb.uidValidity };
  }

  async updateFlags(
    user: string,
    mailbox: string,
    uids: number[],
    op: 'set' | 'add' | 'remove',
    flags: Flag[],
    opts: { unchangedSince?: number } = {},
  ): Promise<{ updated: MessageMeta[]; failed: number[] }> {
    this.assertWritable();
    const { u, mb } = this.mailbox(user, mailbox);
    const given = normalizeFlags(flags);
    const givenLow = new Set(given.map((f) => f.toLowerCase()));
    const failed: number[] = [];
    const targets: number[] = [];
    const ch: Array<[number, Flag[], number]> = [];
    const modseq = mb.highestModseq + 1;
    for (const uid of [...new Set(uids)].sort((a, b) => a - b)) {
      const m = mb.msgs.get(uid);
      if (!m) continue;
      if (opts.unchangedSince !== undefined && m.modseq > opts.unchangedSince) {
        failed.push(uid);
        continue;
      }
      targets.push(uid);
      let next: Flag[];
      if (op === 'set') next = given;
      else if (op === 'add') next = [...m.flags, ...given.filter((f) => !m.flags.some((x) => x.toLowerCase() === f.toLowerCase()))];
      else next = m.flags.filter((f) => !givenLow.has(f.toLowerCase()));
      const same = next.length === m.flags.length && next.every((f) => m.flags.some((x) => x.toLowerCase() === f.toLowerCase()));
      if (!same) ch.push([uid, next, modseq]);
    }
    if (ch.length) {
      this.reserve(256 + ch.length * 64);
      this.appendOp({ op: 'flags', user: u.name, mbox: mb.name, ch });
      await this.commit([{ user: u.name, mailbox: mb.name, kind: 'flags', uids: ch.map((c) => c[0]), modseq }]);
    }
    const updated: MessageMeta[] = [];
    for (const uid of targets) {
      const m = mb.msgs.get(uid);
      if (m) updated.push({ uid: m.uid, size: m.size, internalDate: m.date, flags: [...m.flags], modseq: m.modseq, bodyId: m.body });
    }
    return { updated, failed };
  }

  async expunge(user: string, mailbox: string, uids: number[]): Promise<number[]> {
    this.assertWritable();
    const { u, mb } = this.mailbox(user, mailbox);
    const gone = [...new Set(uids)].filter((uid) => mb.msgs.has(uid)).sort((a, b) => a - b);
    if (!gone.length) return [];
    this.reserve(256 + gone.length * 12);
    const modseq = mb.highestModseq + 1;
    this.appendOp({ op: 'exp', user: u.name, mbox: mb.name, uids: gone, modseq });
    await this.commit([{ user: u.name, mailbox: mb.name, kind: 'expunge', uids: gone, modseq }]);
    return gone;
  }

  private copyOps(user: string, from: string, uids: number[], to: string, move: boolean): { uidValidity: number; mapping: Array<[number, number]>; changes: StoreChange[] } {
    const { u, mb: src } = this.mailbox(user, from);
    const { mb: dst } = this.mailbox(user, to);
    const list = [...new Set(uids)].filter((uid) => src.msgs.has(uid)).sort((a, b) => a - b);
    if (!list.length) return { uidValidity: dst.uidValidity, mapping: [], changes: [] };
    if (!move) this.quotaCheck(u.name, u, list.reduce((n, uid) => n + src.msgs.get(uid)!.size, 0));
    this.reserve(512 + list.length * 40);
    const modseq = dst.highestModseq + 1;
    const map: Array<[number, number, number]> = list.map((uid, i) => [uid, dst.uidNext + i, modseq]);
    this.appendOp({ op: 'copy', user: u.name, from: src.name, to: dst.name, map });
    const changes: StoreChange[] = [{ user: u.name, mailbox: dst.name, kind: 'exists', uids: map.map((m) => m[1]), modseq }];
    if (move && src !== dst) {
      const smod = src.highestModseq + 1;
      this.appendOp({ op: 'exp', user: u.name, mbox: src.name, uids: list, modseq: smod });
      changes.push({ user: u.name, mailbox: src.name, kind: 'expunge', uids: list, modseq: smod });
    }
    return { uidValidity: dst.uidValidity, mapping: map.map((m) => [m[0], m[1]]), changes };
  }

  async copy(user: string, from: string, uids: number[], to: string): Promise<{ uidValidity: number; mapping: Array<[number, number]> }> {
    this.assertWritable();
    const r = this.copyOps(user, from, uids, to, false);
    if (r.mapping.length) await this.commit(r.changes);
    return { uidValidity: r.uidValidity, mapping: r.mapping };
  }

  async move(user: string, from: string, uids: number[], to: string): Promise<{ uidValidity: number; mapping: Array<[number, number]> }> {
    this.assertWritable();
    const r = this.copyOps(user, from, uids, to, true);
    if (r.mapping.length) await this.commit(r.changes);
    return { uidValidity: r.uidValidity, mapping: r.mapping };
  }

  async quota(user: string): Promise<{ usedBytes: number; limitBytes: number | null }> {
    this.assertOpen();
    const u = this.state.user(checkUser(user));
    return { usedBytes: u?.usedBytes ?? 0, limitBytes: this.limitFor(user) };
  }

  async stats(): Promise<StoreStats> {
    this.assertOpen();
    const c = this.counts();
    return { mailboxes: c.mailboxes, messages: c.messages, bytesUsed: this.bytesUsedNow(), bytesTotal: this.device.size, bodyBytes: c.bodyBytes };
  }

  async getBodyMeta(bodyId: string, kind: string): Promise<string | null> {
    this.assertOpen();
    return this.state.bodies.get(bodyId)?.meta?.[kind] ?? null;
  }

  async setBodyMeta(bodyId: string, kind: string, value: string): Promise<void> {
    this.assertWritable();
    if (!kind || kind.length > 64 || value.length > 256 * 1024) throw new BadInputError('body metadata too large');
    const b = this.state.bodies.get(bodyId);
    if (!b) throw new NotFoundError(`no message body ${String(bodyId).slice(0, 80)}`);
    if (b.meta?.[kind] === value) return;
    this.reserve(value.length + 1024);
    this.appendOp({ op: 'meta', body: bodyId, kind, value });
    // A cache entry (derivable from the body): written with the next group commit, not waited for.
    this.writer.commit().catch(() => undefined);
  }

  // ------------------------------------------------------------------ checkpoints

  /** Writes a checkpoint of the indexes and points the superblock at it. */
  checkpoint(): Promise<void> {
    if (this.checkpointing) return this.checkpointing;
    this.checkpointing = this.doCheckpoint().finally(() => {
      this.checkpointing = null;
    });
    return this.checkpointing;
  }

  private async doCheckpoint(): Promise<void> {
    if (this.opts.readOnly || this.writer.failed || !this.device.writable) return;
    const started = Date.now();
    // Synchronous from here to the last append: the snapshot is exactly the state before these records.
    const startPos = { ...this.writer.pos };
    const snap = this.state.snapshot({ chain: [...this.chain] });
    const chunk = this.writer.maxRecord - HEADER_SIZE - 8 - BLOCK_SIZE;
    const count = Math.max(1, Math.ceil(snap.length / chunk));
    this.reserve(snap.length + count * 64, true);
    for (let i = 0; i < count; i++) {
      const part = snap.subarray(i * chunk, (i + 1) * chunk);
      const p = Buffer.allocUnsafe(8 + part.length);
      p.writeUInt32LE(i, 0);
      p.writeUInt32LE(count, 4);
      part.copy(p, 8);
      this.writer.append(RecordType.CKPT, p);
    }
    // Replay starts where the first chunk was appended (possibly at a SEG_END leading to it).
    const first: LogPosition = startPos;
    this.lastCheckpointAt = this.writer.bytesAppended;
    await this.writer.commit();
    const prev = this.sb.checkpoint;
    const sb: Superblock = { ...this.sb, generation: this.sb.generation + 1, checkpoint: first, prevCheckpoint: prev };
    await this.device.write((sb.generation % 2) * BLOCK_SIZE, encodeSuperblock(sb));
    this.sb = sb;
    // Segments before the older of the two checkpoints are no longer needed for recovery.
    const keepFrom = segmentOf(this.g, (prev ?? first).offset);
    const idx = this.chain.indexOf(keepFrom);
    if (idx > 0) for (const s of this.chain.splice(0, idx)) this.inChain.delete(s);
    this.log.debug({ bytes: snap.length, ms: Date.now() - started, free: this.freeSegments() }, 'checkpoint written');
  }

  // ------------------------------------------------------------------ compaction

  private backgroundCompact(urgent = false): void {
    if (this.compacting || this.closed || this.opts.readOnly || (this.opts.compactBytesPerSec ?? 1) === 0) return;
    const free = this.freeSegments();
    if (!urgent && free > this.g.segmentCount * 0.3) return;
    // When a change was refused for space, clean every segment with dead space in it, fullest of dead first.
    this.compact({ bytesPerSec: this.opts.compactBytesPerSec ?? 32 * 1024 * 1024, maxLiveRatio: urgent ? 0.95 : 0.75 }).catch((err: unknown) => this.log.warn({ err }, 'background compaction failed'));
  }

  /**
   * Moves live bodies out of sparse segments (those not needed for recovery) so that the
   * segments become free. I/O is bounded by `bytesPerSec`; readers keep reading the old copies
   * until each body's new location is durable.
   */
  compact(opts: { bytesPerSec?: number; maxLiveRatio?: number; onProgress?: (done: number, total: number) => void } = {}): Promise<CompactResult> {
    if (this.compacting) return this.compacting;
    this.compacting = this.doCompact(opts).finally(() => {
      this.compacting = null;
    });
    return this.compacting;
  }

  private async doCompact(opts: { bytesPerSec?: number; maxLiveRatio?: number; onProgress?: (done: number, total: number) => void }): Promise<CompactResult> {
    this.assertWritable();
    // A checkpoint first, so that older segments drop out of the recovery chain (on a full volume it may not fit:
    // compaction then works with the reserved segments and checkpoints at the end).
    await this.checkpoint().catch((err: unknown) => this.log.warn({ err: err instanceof Error ? err.message : String(err) }, 'checkpoint before compaction failed'));
    const ratio = opts.maxLiveRatio ?? 0.75;
    const candidates: number[] = [];
    for (let s = 0; s < this.g.segmentCount; s++) {
      if (!this.inChain.has(s) && this.live[s]! > 0 && this.live[s]! <= this.g.segmentSize * ratio) candidates.push(s);
    }
    candidates.sort((a, b) => this.live[a]! - this.live[b]!);
    const result: CompactResult = { segmentsFreed: 0, bodiesMoved: 0, bytesMoved: 0 };
    const rate = opts.bytesPerSec ?? 0;
    let done = 0;
    for (const seg of candidates) {
      if (this.closed || this.writer.failed) break;
      const ids: string[] = [];
      for (const [id, b] of this.state.bodies) if (b.chunks.some((c) => c && segmentOf(this.g, c.offset) === seg)) ids.push(id);
      for (const id of ids) {
        const b = this.state.bodies.get(id);
        if (!b || !b.chunks.some((c) => c && segmentOf(this.g, c.offset) === seg)) continue;
        const t0 = Date.now();
        const data = await this.readBody(id, b);
        // Still live and still here after the await? Then copy it to the head of the log.
        const now = this.state.bodies.get(id);
        if (!now || !now.chunks.some((c) => c && segmentOf(this.g, c.offset) === seg) || this.closed) continue;
        try {
          this.reserve(this.bodyRecordsSize(data.length), true);
        } catch {
          break;
        }
        this.appendBody(id, [data], data.length);
        this.pendingBodies.set(id, [data]);
        try {
          await this.writer.commit();
        } finally {
          this.pendingBodies.delete(id);
        }
        result.bodiesMoved++;
        result.bytesMoved += data.length;
        if (rate > 0) {
          const wait = (data.length * 2 * 1000) / rate - (Date.now() - t0);
          if (wait > 1) await new Promise((r) => setTimeout(r, Math.min(wait, 2000)));
        }
      }
      if (this.live[seg]! <= 0) result.segmentsFreed++;
      opts.onProgress?.(++done, candidates.length);
    }
    if (result.bodiesMoved) await this.checkpoint();
    this.log.info({ ...result, free: this.freeSegments() }, 'compaction done');
    return result;
  }

  // ------------------------------------------------------------------ check

  /** Full scan: every live body read back and verified, index consistency checked. */
  async check(onProgress?: (done: number, total: number) => void): Promise<CheckReport> {
    this.assertOpen();
    const problems = [...this.recovery.problems];
    // The log's end after a crash (a torn last write, or stale data of an earlier pass over a reused segment) is
    // expected; it is reported as a note. Damage inside the log shows as missing or damaged bodies below.
    const notes: string[] = [];
    if (this.recovery.truncatedAt !== null) notes.push(`log tail truncated at ${this.recovery.truncatedAt} (${this.recovery.stop}: ${this.recovery.stopDetail ?? ''})`);
    else if (this.recovery.stop !== 'end') notes.push(`log ends at ${this.recovery.stop}: ${this.recovery.stopDetail ?? ''}`);
    if (this.recovery.usedFallbackCheckpoint) problems.push('the latest checkpoint was unreadable; the previous one was used');
    const refs = new Map<string, number>();
    let messages = 0;
    for (const u of this.state.users.values()) {
      let used = 0;
      for (const mb of u.mailboxes.values()) {
        let maxUid = 0;
        for (const m of mb.msgs.values()) {
          messages++;
          used += m.size;
          maxUid = Math.max(maxUid, m.uid);
          if (m.modseq > mb.highestModseq) problems.push(`${u.name}/${mb.name} uid ${m.uid}: modseq above the mailbox's highest`);
          refs.set(m.body, (refs.get(m.body) ?? 0) + 1);
          const b = this.state.bodies.get(m.body);
          if (!b) problems.push(`${u.name}/${mb.name} uid ${m.uid}: body ${m.body} missing`);
          else if (b.size !== m.size) problems.push(`${u.name}/${mb.name} uid ${m.uid}: size ${m.size} differs from body ${b.size}`);
        }
        if (maxUid >= mb.uidNext) problems.push(`${u.name}/${mb.name}: UIDNEXT ${mb.uidNext} not above uid ${maxUid}`);
      }
      if (used !== u.usedBytes) problems.push(`${u.name}: quota usage ${u.usedBytes} differs from ${used}`);
    }
    let i = 0;
    let bodyBytes = 0;
    const total = this.state.bodies.size;
    for (const [id, b] of this.state.bodies) {
      if ((refs.get(id) ?? 0) !== b.refs) problems.push(`body ${id}: reference count ${b.refs}, linked ${refs.get(id) ?? 0} times`);
      try {
        await this.readBody(id, b);
        bodyBytes += b.size;
      } catch (err) {
        problems.push(err instanceof Error ? err.message : String(err));
      }
      if (++i % 200 === 0 || i === total) onProgress?.(i, total);
    }
    return { ok: problems.length === 0, records: this.recovery.replayedRecords, bodies: total, bodyBytes, messages, problems, notes, recovery: this.recovery };
  }

  /** True once a log write failed: the store must be reopened (the volume may be gone). */
  failed(): boolean {
    return this.writer.failed !== null;
  }

  // ------------------------------------------------------------------ close

  /** Waits for in-flight writes; the store stays open. */
  async flush(): Promise<void> {
    await this.writer.idle();
    await this.device.flush();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    if (this.compactTimer) clearInterval(this.compactTimer);
    this.compactTimer = null;
    const compacting = this.compacting;
    this.closed = true;
    await compacting?.catch(() => undefined);
    await this.writer.idle();
    await this.checkpointing?.catch(() => undefined);
    if (!this.opts.readOnly && !this.writer.failed && this.device.writable && this.writer.bytesAppended > this.lastCheckpointAt) {
      try {
        await this.doCheckpoint();
      } catch (err) {
        this.log.warn({ err }, 'final checkpoint failed; the next open replays the log');
      }
    }
    const reg = this.opts.registry ? byRegistry.get(this.opts.registry) : undefined;
    if (reg?.store === this) reg.store = null;
    this.cache.clear();
    this.log.info('store closed');
  }
}

/** Total length of a body given as parts. */
function partsLength(parts: readonly Buffer[]): number {
  let n = 0;
  for (const p of parts) n += p.length;
  return n;
}

function sha256OfParts(parts: readonly Buffer[]): string {
  const h = createHash('sha256');
  for (const p of parts) h.update(p);
  return h.digest('hex');
}

/** The bytes [start, end) of the concatenation of `parts`, as views of the parts (no copy). */
export function sliceParts(parts: readonly Buffer[], start: number, end: number): Buffer[] {
  const out: Buffer[] = [];
  let at = 0;
  for (const p of parts) {
    const pEnd = at + p.length;
    if (pEnd > start && at < end) {
      const from = Math.max(start, at) - at;
      const to = Math.min(end, pEnd) - at;
      out.push(from === 0 && to === p.length ? p : p.subarray(from, to));
    }
    if (pEnd >= end) break;
    at = pEnd;
  }
  return out;
}

/** Applies one replayed record to the indexes. */
function applyRecord(state: StoreState, type: number, payload: Buffer, offset: number, length: number, problems: string[]): void {
  switch (type) {
    case RecordType.BODY: {
      const id = payload.subarray(0, SHA_LEN).toString('hex');
      state.bodyChunk(id, payload.readUInt32LE(SHA_LEN), payload.readUInt32LE(SHA_LEN + 4), payload.readUInt32LE(SHA_LEN + 8), { offset, length });
      return;
    }
    case RecordType.OP: {
      let op: Op;
      try {
        op = JSON.parse(payload.toString('utf8')) as Op;
      } catch {
        problems.push(`record at ${offset}: operation does not parse`);
        return;
      }
      state.apply(op);
      return;
    }
    default:
      return; // SEG_END; CKPT of a checkpoint the superblock never pointed at
  }
}
