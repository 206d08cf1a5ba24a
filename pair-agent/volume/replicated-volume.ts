/**
 * A DRBD-style replicated block volume: one node of a pair. The store writes through it as
 * through any BlockDevice; on the primary each write is sent to the peer and acknowledged per
 * the protocol (A: local disk and sent, B: the peer received it, C: both disks have it).
 *
 * States, as DRBD names them:
 *   role        primary | secondary
 *   disk        UpToDate | Inconsistent (resync target mid-way) | Failed (I/O error, detached)
 *   connection  StandAlone (not trying: operator or split brain) | Connecting | Connected |
 *               SyncSource | SyncTarget
 *
 * While disconnected, a primary records every block it writes in the out-of-sync bitmap under a
 * new data generation UUID; on reconnect the UUIDs decide the direction (uuid-compare.ts) and
 * only the marked blocks cross the link. Resync sends blocks in offset order, rate limited; the
 * target is Inconsistent (and persisted so) until the last block and the final flush.
 */
import { EventEmitter } from 'node:events';
import { createHash, randomBytes } from 'node:crypto';
import net from 'node:net';
import { existsSync } from 'node:fs';
import { BadInputError, ConflictError, ProtocolError, UnavailableError } from '../../common/errors.ts';
import type { Logger } from '../../common/log.ts';
import type { MetricsRegistry } from '../../common/metrics.ts';
import { BLOCK_SIZE, DIRECT_CHUNK, FileBlockDevice, checkRange, sliceWriteData, writeLength, type BlockDevice, type WriteData } from './block-device.ts';
import type { VolumeConfig } from './config.ts';
import {
  AL_EXTENTS,
  ActivityLogFile,
  Bitmap,
  activityLogPath,
  EXTENT_BLOCKS,
  JUST_CREATED,
  NO_UUID,
  encodeMetadata,
  freshMetadata,
  readMetadata,
  retireBitmapUuid,
  rotateUuids,
  writeMetadata,
  type DiskState,
  type Uuids,
  type VolumeMetadata,
} from './metadata.ts';
import { compareUuids, splitBrainVictim, type SyncDecision } from './uuid-compare.ts';
import { volumeMetrics, type VolumeMetrics } from './metrics.ts';
import {
  FLAG_MORE,
  FrameDecoder,
  FrameType,
  MAX_PAYLOAD,
  authMatches,
  authResponse,
  decodeBlockWriteParts,
  decodeJson,
  decodeRange,
  decodeSeq,
  decodeSeqs,
  encodeBlockWrite,
  encodeFrame,
  encodeJson,
  encodeRange,
  encodeSeq,
  encodeSeqs,
  type Frame,
  type Hello,
} from './wire.ts';

export type Role = 'primary' | 'secondary';
export type ConnectionState = 'StandAlone' | 'Connecting' | 'Connected' | 'SyncSource' | 'SyncTarget';

/** What each node tells the other after the handshake and on every change. */
interface PeerState {
  name: string;
  role: Role;
  disk: DiskState;
  uuids: Uuids;
  primaryCrashed: boolean;
  primarySince: number;
  changes: number;
  discardMyData: boolean;
  /** Set when the sender starts a resync to us after an online verify. */
  verifyResync?: boolean;
}

export interface VolumeStatus {
  name: string;
  node: string;
  role: Role;
  disk: DiskState;
  connection: ConnectionState;
  protocol: 'A' | 'B' | 'C';
  splitBrain: boolean;
  /** Writes held (fencing resource-and-stonith) since the link was lost, until the peer is outdated or fenced. */
  peerFence: { since: number; reason: string; failed: boolean } | null;
  sizeBytes: number;
  outOfSyncBytes: number;
  peer: { name: string; role: Role; disk: DiskState } | null;
  resync: { direction: 'source' | 'target'; totalBytes: number; bytesLeft: number; rateBytesPerSec: number; etaSec: number | null } | null;
  uuids: Uuids;
  lastDecision: { decision: SyncDecision; rule: number } | null;
  stats: { dataBytesSent: number; resyncBytesSent: number; resyncBytesReceived: number; framesRejected: number; verifiedBlocks: number; verifyOutOfSync: number };
}

interface PendingWrite {
  first: number;
  blocks: number;
  needsPeer: 'none' | 'recv' | 'write';
  done: () => void;
  /** Not acknowledged after all (held for the peer, then the volume was demoted or closed). */
  fail: (err: Error) => void;
}

interface Link {
  socket: net.Socket;
  decoder: FrameDecoder;
  sendSeq: number;
  myNonce: string;
  peerHello: Hello | null;
  authSent: boolean;
  authenticated: boolean;
  peerState: PeerState | null;
  peerBitmap: Uint8Array | null;
  lastHeard: number;
  decided: boolean;
  closed: boolean;
  handshakeTimer: NodeJS.Timeout | null;
  /** Frames held until the end of this tick (see sendAfterLocalWrites), in link order; null when none. */
  held: OutFrame[] | null;
}

/**
 * A frame to send. `sent`: called once the frame is in the kernel's send buffer, or will never be
 * sent (the link went away); until then the socket may still read from the payload's buffers.
 */
interface OutFrame {
  type: FrameType;
  seq: number;
  payload: Buffer | Buffer[] | undefined;
  flags?: number;
  sent?: () => void;
}

const RESYNC_RUN_BLOCKS = 64;
const RESYNC_WINDOW_BYTES = 8 * 1024 * 1024;
/** The largest write one DATA frame carries (the frame limit, MAX_PAYLOAD, leaves room for the header). */
const MAX_WRITE_BYTES = 1024 * 1024;
const VERIFY_RUN_BLOCKS = 256;
const META_FLUSH_MS = 1000;
/** The reason a primary gives when it refuses its peer's promotion (a stable string: the asker turns it into its own error). */
const PEER_IS_PRIMARY = 'this node is primary';

function sha(data: Buffer): Buffer {
  return createHash('sha256').update(data).digest();
}

export class ReplicatedVolume extends EventEmitter implements BlockDevice {
  readonly size: number;
  readonly nodeName: string;
  private role: Role = 'secondary';
  private connection: ConnectionState = 'Connecting';
  private splitBrain = false;
  /**
   * Writes held until the peer cannot be promoted with old data (config.fencing
   * resource-and-stonith): `ended` resolves true when they may go on, false when they fail; `held`
   * are writes the peer never confirmed, acknowledged or failed with them.
   */
  private peerFence: { since: number; reason: string; ended: Promise<boolean>; end: (go: boolean) => void; held: PendingWrite[]; failed: boolean; warnedAt: number } | null = null;
  private discardMyData = false;
  private link: Link | null = null;
  private server: net.Server | null = null;
  private reconnectTimer: NodeJS.Timeout | null = null;
  private pingTimer: NodeJS.Timeout | null = null;
  private metaTimer: NodeJS.Timeout | null = null;
  private metaDirty = false;
  /** The bytes this volume last wrote to its metadata file (null: not yet): an unchanged copy is not written again. */
  private persistedMeta: Buffer | null = null;
  private closed = false;
  private dataSeq = 0;
  private readonly pending = new Map<number, PendingWrite>();
  private resyncState: { direction: 'source' | 'target'; totalBytes: number; startedAt: number; sent: number; inFlight: number; ackWaiters: Array<() => void> } | null = null;
  private lastDecision: { decision: SyncDecision; rule: number } | null = null;
  private verifyWaiters = new Map<number, (digests: Buffer) => void>();
  private applyChain: Promise<void> = Promise.resolve();
  /** Peer frames queued or being applied (the one running included). */
  private applyQueued = 0;
  /** Sequence numbers of peer writes applied (protocol C) and waiting for the next flush. */
  private unflushed: Array<{ link: Link; seq: number }> = [];
  private unflushedBytes = 0;
  /** Peer data writes (not resync blocks) queued and not yet started. */
  private queuedData = 0;
  /** The link whose last applied DATA frame said MORE (its flush waits for the next one); else null. */
  private moreFrom: Link | null = null;
  /** WriteAck sequence numbers gathered in this turn of the event loop: sent as one frame. */
  private ackBatch: number[] = [];
  /**
   * A promotion in progress: 'asking' while our PromoteRequest waits for the peer's answer,
   * 'granted' from the grant until the role is set. A request from the peer meanwhile is refused
   * (or, when both ask at once, the lower node name wins), so two racing promotions never both succeed.
   */
  private promoting: 'none' | 'asking' | 'granted' = 'none';
  private promoteReply: ((answer: { granted: boolean; reason: string }) => void) | null = null;
  /** Called when the link in progress is decided or lost (a promotion waits for the handshake). */
  private settleWaiters: Array<() => void> = [];
  private readonly metrics: VolumeMetrics;
  private readonly stats = { dataBytesSent: 0, resyncBytesSent: 0, resyncBytesReceived: 0, framesRejected: 0, verifiedBlocks: 0, verifyOutOfSync: 0 };
  private rateWindow = { at: Date.now(), bytes: 0, rate: 0 };

  private constructor(
    private readonly config: VolumeConfig,
    private readonly dev: FileBlockDevice,
    private meta: VolumeMetadata,
    private readonly al: ActivityLogFile,
    private readonly log: Logger,
    registry: MetricsRegistry,
  ) {
    super();
    this.size = config.sizeBytes;
    this.nodeName = config.listen;
    this.metrics = volumeMetrics(registry, config.name);
    if (meta.uuids.current === JUST_CREATED && meta.disk === 'UpToDate') {
      // Metadata made before fresh volumes started Inconsistent: never met a peer, never
      // promoted, so it holds nothing a peer could lack. Treated as fresh, i.e. Inconsistent.
      meta.disk = 'Inconsistent';
      meta.flags.consistent = false;
      writeMetadata(config.metaFile, meta);
      log.warn({ volume: config.name }, 'volume: fresh metadata marked UpToDate by an older build: now Inconsistent until it meets its peer');
    }
    // A primary that stopped without demoting may have had writes in flight in its hot extents.
    if (meta.flags.primaryCrashed) {
      // The AL file is written before any data enters a new extent; the metadata's copy may be
      // older or (after a torn AL write) newer: the union covers every extent that can differ.
      const extents = [...new Set([...meta.activityLog, ...al.extents])];
      for (const e of extents) meta.bitmap.setRange(e * EXTENT_BLOCKS, EXTENT_BLOCKS);
      meta.activityLog = extents.slice(-AL_EXTENTS);
      log.warn({ extents: extents.length }, 'volume: this node crashed as primary; its activity-log extents will be resynced');
    }
  }

  /** Opens (creating when missing) the data and metadata files, then starts the link. */
  static async open(config: VolumeConfig, deps: { log: Logger; registry: MetricsRegistry }): Promise<ReplicatedVolume> {
    let meta = readMetadata(config.metaFile);
    if (meta && meta.sizeBytes !== config.sizeBytes) {
      throw new BadInputError(`volume ${config.name}: ${config.metaFile} describes ${meta.sizeBytes} bytes but the config says ${config.sizeBytes}`);
    }
    if (!meta) {
      // Two fresh volumes skip the initial sync (rule 10) because fresh means all zeros; a data
      // file without its metadata may hold anything, so it is never taken for fresh.
      if (existsSync(config.dataFile)) {
        throw new ConflictError(
          `volume ${config.name}: ${config.dataFile} exists but ${config.metaFile} does not; \`pairgate volume create --force\` starts this node over (its data is wiped and the peer's is synced to it)`,
        );
      }
      meta = freshMetadata(config.sizeBytes);
      writeMetadata(config.metaFile, meta);
      deps.log.info({ volume: config.name, sizeBytes: config.sizeBytes }, 'volume: created new metadata');
    }
    const dev = await FileBlockDevice.open(config.dataFile, { size: config.sizeBytes, create: true });
    const al = await ActivityLogFile.open(activityLogPath(config.metaFile)).catch(async (err) => {
      await dev.close();
      throw err;
    });
    const v = new ReplicatedVolume(config, dev, meta, al, deps.log, deps.registry);
    try {
      await v.startLink();
    } catch (err) {
      // e.g. the replication port is taken: no file handles or timers left behind.
      if (v.pingTimer) clearInterval(v.pingTimer);
      await al.close();
      await dev.close();
      throw err;
    }
    v.metaTimer = setInterval(() => {
      v.warnIfHeld();
      void v.flushMetaIfDirty();
    }, META_FLUSH_MS);
    v.metaTimer.unref();
    v.updateGauges();
    return v;
  }

  // --- the BlockDevice the store uses ------------------------------------------------------

  get writable(): boolean {
    return this.role === 'primary' && this.meta.disk === 'UpToDate' && !this.closed;
  }

  private checkUsable(what: string): void {
    if (this.closed) throw new UnavailableError(`volume ${this.config.name} is closed`);
    if (this.role !== 'primary') throw new UnavailableError(`volume ${this.config.name} is secondary: no ${what}`);
    if (this.meta.disk !== 'UpToDate') throw new UnavailableError(`volume ${this.config.name}: disk is ${this.meta.disk}: no ${what}`);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    checkRange(this.size, offset, length, false);
    this.checkUsable('reads');
    try {
      return await this.dev.read(offset, length);
    } catch (err) {
      throw this.diskFailed(err);
    }
  }

  async write(offset: number, data: WriteData): Promise<void> {
    const length = writeLength(data);
    checkRange(this.size, offset, length, true);
    this.checkUsable('writes');
    // Parts (records around a large payload) go to the local disk and into the DATA frame as they
    // are, never joined (a fresh 1 MiB buffer costs 0.6-1.9 ms here, mostly page faults). One DATA
    // frame carries at most MAX_WRITE_BYTES: a larger write goes as several writes, each a list of
    // views of the parts, in flight together (ordered by sequence, sharing flushes); it resolves
    // when all are durable.
    if (length > MAX_WRITE_BYTES) {
      const pieces: Array<Promise<void>> = [];
      for (let at = 0; at < length; at += MAX_WRITE_BYTES) pieces.push(this.write(offset + at, sliceWriteData(data, at, Math.min(length, at + MAX_WRITE_BYTES))));
      await Promise.all(pieces);
      return;
    }
    const started = process.hrtime.bigint();
    const first = offset / BLOCK_SIZE;
    const blocks = length / BLOCK_SIZE;
    const alDone = this.coverActivityLog(first, blocks);
    if (alDone) {
      try {
        await alDone;
      } catch (err) {
        throw this.diskFailed(err);
      }
      this.checkUsable('writes');
    }
    // Held for the peer: checked in the same tick as `replicating()` below, after every await.
    while (this.peerFence) {
      if (!(await this.peerFence.ended)) throw new UnavailableError(`volume ${this.config.name}: write not made: held for the peer, then the held writes failed (the volume is being demoted, closed or released)`);
      this.checkUsable('writes');
    }
    // The local write goes to the I/O threads first; the frame is checksummed and copied to the
    // socket meanwhile. The device hands this tick's writes to the I/O threads at the end of the
    // tick (so that writes issued together share a flush), so the frame is held until then too:
    // sent at once, its CRC and socket copy (~0.5-1 ms of this thread for 1 MiB) would run before
    // the local write had even started, and the two would add up instead of overlapping.
    const local = this.dev.write(offset, data);
    local.catch(() => undefined); // awaited below; never an unhandled rejection meanwhile
    const link = this.replicating() ? this.link : null;
    let peerDone: Promise<void> = Promise.resolve();
    if (link) {
      // The DATA frame carries whole blocks: once sent, these blocks are the peer's business; a
      // lost link puts them back in the bitmap (pending writes are re-marked on disconnect).
      this.meta.bitmap.clearRange(first, blocks);
      const needsPeer = this.config.protocol === 'A' ? 'none' : this.config.protocol === 'B' ? 'recv' : 'write';
      // Protocol A, as DRBD's: complete once the local write is done and the frame is in the TCP
      // send buffer (B and C wait for the peer as well; see `sent` below for why all three wait
      // for the send buffer).
      // A write over config.dataFrameBytes leaves as several DATA frames (one checksum, one
      // sequence number, one pending entry each; sent together, so all but the last say MORE): the
      // peer verifies and writes each piece as it completes while the next is still on the way,
      // then flushes once and acknowledges them all together. Durable on the peer = every piece's ack.
      const waits: Array<Promise<void>> = [];
      const pieceBytes = this.config.dataFrameBytes;
      for (let at = 0; at < length; at += pieceBytes) {
        const end = Math.min(length, at + pieceBytes);
        const seq = ++this.dataSeq;
        if (needsPeer !== 'none') {
          waits.push(new Promise<void>((resolve, reject) => this.pending.set(seq, { first: first + at / BLOCK_SIZE, blocks: (end - at) / BLOCK_SIZE, needsPeer, done: resolve, fail: reject })));
        }
        // Every protocol waits for the frame to leave the socket: until then the socket reads the
        // caller's buffers, which the caller may reuse as soon as the write resolves (the store's
        // LMTP reads do: ReadArena). For B and C this matters when the link is lost: that resolves
        // their pending entries at once (blocks back in the bitmap) while the frame may still be queued.
        let sent!: () => void;
        waits.push(new Promise<void>((resolve) => (sent = resolve)));
        const piece = at === 0 && end === length ? data : sliceWriteData(data, at, end);
        this.sendAfterLocalWrites(link, { type: FrameType.Data, seq, payload: encodeBlockWrite(offset + at, piece), sent });
      }
      if (waits.length === 1) peerDone = waits[0]!;
      else if (waits.length > 1) peerDone = Promise.all(waits).then(() => undefined);
      this.stats.dataBytesSent += length;
      this.metrics.bytesSent('data', length);
    } else {
      this.meta.bitmap.setRange(first, blocks);
      this.metaDirty = true;
    }
    try {
      await local;
    } catch (err) {
      throw this.diskFailed(err);
    }
    await peerDone;
    this.metrics.writes.inc();
    this.metrics.writeSeconds.observe(Number(process.hrtime.bigint() - started) / 1e9);
    // Gauges (out-of-sync bytes and the like) follow within a second (the metadata timer).
  }

  async flush(): Promise<void> {
    if (this.meta.disk === 'Failed') throw new UnavailableError(`volume ${this.config.name}: disk failed`);
    try {
      await this.dev.flush();
    } catch (err) {
      throw this.diskFailed(err);
    }
  }

  /** An I/O error on the local disk: detach (disk Failed), say so, and never acknowledge the write. */
  private diskFailed(err: unknown): Error {
    if (this.meta.disk !== 'Failed') {
      this.meta.disk = 'Failed';
      this.log.error({ volume: this.config.name, err: (err as Error).message }, 'volume: local disk I/O error: disk detached (Failed)');
      this.emit('disk', 'Failed');
      this.sendState();
      this.updateGauges();
    }
    return new UnavailableError(`volume ${this.config.name}: local disk failed: ${(err as Error).message}`, { cause: err });
  }

  private replicating(): boolean {
    return this.link !== null && this.link.decided && (this.connection === 'Connected' || this.connection === 'SyncSource');
  }

  // --- activity log ------------------------------------------------------------------------

  /**
   * Before a write lands in an extent the persisted activity log does not cover, persist it:
   * returns the AL write to wait for (also when another write just added this extent and its AL
   * write is still on the way), or null when the extent is covered already.
   */
  private coverActivityLog(first: number, blocks: number): Promise<void> | null {
    const al = this.meta.activityLog;
    let changed = false;
    for (let e = Math.floor(first / EXTENT_BLOCKS); e <= Math.floor((first + blocks - 1) / EXTENT_BLOCKS); e++) {
      const i = al.indexOf(e);
      if (i >= 0) {
        if (i !== al.length - 1) {
          al.splice(i, 1);
          al.push(e);
        }
        continue;
      }
      al.push(e);
      if (al.length > AL_EXTENTS) al.shift();
      changed = true;
    }
    return changed ? this.al.write(al) : this.al.pending;
  }

  // --- roles -------------------------------------------------------------------------------

  async promote(opts: { force?: boolean } = {}): Promise<VolumeStatus> {
    if (this.closed) throw new UnavailableError('volume is closed');
    if (this.role === 'primary') return this.status();
    if (this.promoting !== 'none') throw new ConflictError(`volume ${this.config.name}: a promotion is already in progress`);
    // A handshake in progress is let finish first: the UUID comparison must see the role and
    // the UUIDs that both sides exchanged, not a generation started in between.
    await this.waitLinkSettled();
    const link = this.link?.decided && !this.link.closed ? this.link : null;
    // With a link, the peer's role as last reported is not checked here: it may be a few
    // milliseconds behind the peer's demotion (the pair agent hears of a release over the
    // heartbeat first, and promotes at once). The peer answers the request itself, refusing while
    // it is primary, and its answer comes after any state it sent before it (one TCP stream).
    this.checkPromotable(opts, { peerRole: link === null });
    if (link) {
      this.promoting = 'asking';
      let answer: { granted: boolean; reason: string };
      try {
        answer = await this.askPeerToPromote(link);
      } finally {
        if (this.promoting === 'asking') this.promoting = 'none';
      }
      if (!answer.granted) {
        this.promoting = 'none';
        if (answer.reason === PEER_IS_PRIMARY) throw new ConflictError(`volume ${this.config.name}: the peer is primary; two primaries are never allowed`);
        throw new ConflictError(`volume ${this.config.name}: the peer refused the promotion: ${answer.reason}`);
      }
      // Granted (or the link is gone, and this node is alone now): from here on only the peer
      // writes already queued for the local disk are awaited (below), the peer refused meanwhile.
      try {
        this.checkPromotable(opts);
      } catch (err) {
        this.promoting = 'none';
        throw err;
      }
    }
    if (this.applyQueued > 0) {
      // The old primary's last writes reached this node before its demotion and its grant (one
      // stream), but may still be queued for the local disk (protocols A and B complete a write
      // before the peer has it on disk). They land first: a primary serving before then would read
      // data without them, and a queued write landing later would overwrite its own. The peer's
      // promotion is refused meanwhile ('granted': this node is being promoted).
      this.promoting = 'granted';
      await this.applyChain;
      try {
        this.checkPromotable(opts);
      } catch (err) {
        this.promoting = 'none';
        throw err;
      }
    }
    if (this.meta.disk !== 'UpToDate') {
      this.log.warn({ volume: this.config.name, disk: this.meta.disk, uuid: this.meta.uuids.current }, 'volume: forced promotion of data that is not UpToDate');
      this.meta.disk = 'UpToDate';
      this.meta.flags.consistent = true;
    }
    if (!this.replicating()) {
      // Alone: a new data generation starts here, and the bitmap records it.
      this.meta.uuids = rotateUuids(this.meta.uuids);
      this.meta.primarySince = Date.now();
    }
    this.role = 'primary';
    this.promoting = 'none';
    // Alone, with a peer not known to be outdated: it may still be promoted with the data it has.
    if (!this.replicating() && !this.meta.flags.peerWasOutdated) this.holdWritesForPeer('promoted without the peer');
    this.meta.flags.primaryEver = true;
    this.meta.flags.primaryCrashed = true;
    this.persistMeta();
    this.log.info({ volume: this.config.name, uuid: this.meta.uuids.current, connection: this.connection }, 'volume: promoted to primary');
    this.sendState();
    this.emit('role', 'primary');
    this.updateGauges();
    return this.status();
  }

  /** Why this node may not become primary now (throws), given what it knows locally. */
  private checkPromotable(opts: { force?: boolean }, check = { peerRole: true }): void {
    if (this.closed) throw new UnavailableError('volume is closed');
    const peer = check.peerRole && this.link?.decided && !this.link.closed ? this.link.peerState : null;
    if (peer?.role === 'primary') throw new ConflictError(`volume ${this.config.name}: the peer is primary; two primaries are never allowed`);
    if (this.meta.disk === 'Failed') throw new ConflictError(`volume ${this.config.name}: disk failed; cannot promote`);
    if (this.meta.disk !== 'UpToDate') {
      if (!opts.force) {
        const why = this.meta.uuids.current === JUST_CREATED
          ? 'this volume is fresh (created, never connected to its peer): it waits for the peer (two fresh volumes start identical; a peer with data syncs it)'
          : 'the peer holds the good data';
        throw new ConflictError(`volume ${this.config.name}: local data is ${this.meta.disk}; ${why}. Promote with --force only if the peer's data is lost for good`);
      }
      if (this.connection === 'SyncTarget') throw new ConflictError('cannot force a promotion in the middle of a resync from the peer');
    }
  }

  private waitLinkSettled(): Promise<void> {
    const link = this.link;
    if (!link || link.decided || link.closed) return Promise.resolve();
    return new Promise<void>((resolve) => {
      const t = setTimeout(done, Math.max(2000, this.config.connectTimeoutMs * 2));
      function done(): void {
        clearTimeout(t);
        resolve();
      }
      this.settleWaiters.push(done);
    });
  }

  private linkSettled(): void {
    for (const w of this.settleWaiters.splice(0)) w();
  }

  /** Sends a PromoteRequest and waits for the peer's answer; a lost link means this node is alone (granted). */
  private askPeerToPromote(link: Link): Promise<{ granted: boolean; reason: string }> {
    return new Promise((resolve) => {
      const t = setTimeout(() => finish({ granted: false, reason: 'no answer from the peer' }), Math.max(1000, this.config.pingTimeoutMs * 2));
      const finish = (a: { granted: boolean; reason: string }) => {
        clearTimeout(t);
        if (this.promoteReply === finish) this.promoteReply = null;
        resolve(a);
      };
      this.promoteReply = finish;
      this.send(link, FrameType.PromoteRequest, 0, encodeJson({ name: this.nodeName }));
    });
  }

  /** The peer asks to become primary: refused while this node is or is becoming primary. */
  private onPromoteRequest(link: Link): void {
    let refuse: string | null = null;
    if (this.role === 'primary') refuse = PEER_IS_PRIMARY;
    else if (this.promoting === 'granted') refuse = 'this node is being promoted';
    else if (this.promoting === 'asking' && this.nodeName < (link.peerHello?.node ?? '')) refuse = 'both nodes asked at once; the lower node name wins';
    if (refuse) this.log.info({ volume: this.config.name, reason: refuse }, 'volume: refused the peer\'s promotion');
    this.send(link, FrameType.PromoteReply, 0, encodeJson({ granted: refuse === null, reason: refuse ?? 'granted' }));
  }

  async demote(): Promise<VolumeStatus> {
    if (this.role === 'secondary') return this.status();
    this.failHeldWrites('the volume is being demoted');
    await this.dev.flush().catch(() => undefined);
    // Writes still waiting for the peer are complete locally; they resolve now.
    this.role = 'secondary';
    // A secondary takes no writes: the (failed) hold has nothing left to refuse.
    this.peerFence = null;
    this.meta.flags.primaryCrashed = false;
    this.meta.activityLog = [];
    this.persistMeta();
    await this.al.write([]).catch(() => undefined);
    this.log.info({ volume: this.config.name }, 'volume: demoted to secondary');
    this.sendState();
    this.emit('role', 'secondary');
    this.updateGauges();
    return this.status();
  }

  /** Stop trying to connect (StandAlone) and drop the link. */
  disconnect(): VolumeStatus {
    this.outdateOnLeavingPrimary('disconnected by the operator');
    this.connection = 'StandAlone';
    if (this.link) this.dropLink(this.link, 'disconnected by the operator', true);
    this.emit('connection', this.connection);
    this.updateGauges();
    return this.status();
  }

  /** Try to connect again (after `disconnect`, a split brain or an unrelated peer). */
  connect(): VolumeStatus {
    if (this.connection === 'StandAlone') {
      this.connection = 'Connecting';
      this.emit('connection', this.connection);
      this.scheduleConnect(0);
    }
    return this.status();
  }

  /**
   * Settles a split brain by hand on the node whose changes are to be dropped: it becomes the
   * sync target of the peer at the next connection.
   */
  resolve(opts: { discardMyData: boolean }): VolumeStatus {
    if (!opts.discardMyData) throw new BadInputError('resolve needs --discard-my-data on the node whose changes are dropped');
    if (this.role === 'primary') throw new ConflictError('demote this node before discarding its data');
    this.discardMyData = true;
    this.log.warn({ volume: this.config.name }, 'volume: operator chose to discard this node\'s data at the next connection');
    return this.connect();
  }

  // --- resource fencing (DRBD's fencing resource-and-stonith) ------------------------------

  /** A primary without its peer: hold writes until `peerSettled` (or the link is back). */
  private holdWritesForPeer(reason: string): void {
    if (this.config.fencing !== 'resource-and-stonith' || this.peerFence) return;
    let end!: (go: boolean) => void;
    const ended = new Promise<boolean>((r) => (end = r));
    this.peerFence = { since: Date.now(), reason, ended, end, held: [], failed: false, warnedAt: Date.now() };
    this.log.warn({ volume: this.config.name, reason }, 'volume: writes held until the peer is outdated or fenced (fencing resource-and-stonith)');
    this.emit('fence-peer', reason);
  }

  private releaseWrites(why: string): void {
    const fence = this.peerFence;
    if (!fence) return;
    this.peerFence = null;
    if (!fence.failed) {
      this.log.warn({ volume: this.config.name, why, heldMs: Date.now() - fence.since, inFlight: fence.held.length }, 'volume: held writes go on');
      for (const p of fence.held) p.done();
      fence.end(true);
    } else {
      this.log.warn({ volume: this.config.name, why }, 'volume: writes accepted again');
    }
    this.emit('fence-peer', null);
    this.updateGauges();
  }

  /** Says, every 10 s, that writes are still held, and why (the hold has no bound of its own). */
  private warnIfHeld(): void {
    const fence = this.peerFence;
    if (!fence || fence.failed || Date.now() - fence.warnedAt < 10_000) return;
    fence.warnedAt = Date.now();
    this.log.warn({ volume: this.config.name, reason: fence.reason, heldMs: Date.now() - fence.since, inFlight: fence.held.length }, 'volume: writes still held: waiting for the peer to be outdated or fenced, or for the link (pairgate volume resume-io by hand)');
  }

  /**
   * Fails the held writes (their blocks stay out of sync): the volume is demoted or closed, or the
   * pair agent releases, while the peer may still be promoted without them. Never acknowledged.
   */
  failHeldWrites(why: string): void {
    const fence = this.peerFence;
    if (!fence || fence.failed) return;
    // The fence stays, failed: writes after these are refused too until the volume is demoted or
    // closed, the link is back or the peer is settled (they would be acknowledged alone).
    fence.failed = true;
    fence.reason = `${fence.reason}; held writes failed: ${why}`;
    this.log.warn({ volume: this.config.name, why, heldMs: Date.now() - fence.since, inFlight: fence.held.length }, 'volume: held writes failed (never acknowledged); no write is accepted until the peer is settled or the volume demoted');
    const err = new UnavailableError(`volume ${this.config.name}: write not acknowledged: held for the peer, then ${why}`);
    for (const p of fence.held.splice(0)) p.fail(err);
    fence.end(false);
    this.updateGauges();
  }

  /**
   * The peer cannot be promoted with the data it has: its disk is marked Outdated (it said so), or
   * it was fenced. Held writes go on; remembered (metadata) until the peer is connected again.
   */
  peerSettled(how: 'outdated' | 'fenced'): VolumeStatus {
    if (!this.peerFence) return this.status();
    this.meta.flags.peerWasOutdated = true;
    this.persistMeta();
    this.releaseWrites(how === 'outdated' ? 'the peer marked its disk Outdated' : 'the peer was fenced');
    return this.status();
  }

  /**
   * A secondary that leaves its connected primary on purpose (closing, disconnecting) marks its
   * data Outdated, as DRBD does: the primary goes on without it, and after a restart it must not
   * be promoted with what it has now (the primary may die before they meet again).
   */
  private outdateOnLeavingPrimary(why: string): void {
    if (this.config.fencing !== 'resource-and-stonith' || this.role !== 'secondary' || this.meta.disk !== 'UpToDate') return;
    if (!this.replicating() || this.link?.peerState?.role !== 'primary') return;
    this.meta.disk = 'Outdated';
    this.persistMeta();
    this.log.warn({ volume: this.config.name, why }, 'volume: leaving a primary peer: disk marked Outdated (resynced at the next connection)');
    this.emit('disk', this.meta.disk);
  }

  /**
   * Marks this secondary's data Outdated (durably), at the request of a primary that lost its link
   * to it: from now on it is not promoted without --force, and it becomes UpToDate again only by
   * a resync from the peer.
   */
  outdate(): VolumeStatus {
    if (this.role === 'primary') throw new ConflictError(`volume ${this.config.name}: primary; only a secondary is outdated`);
    // This node outdated its peer and wrote alone since: its data is the newer one.
    if (this.meta.flags.peerWasOutdated) throw new ConflictError(`volume ${this.config.name}: this node wrote without its peer after outdating it: its data is the newer`);
    if (this.replicating()) throw new ConflictError(`volume ${this.config.name}: connected to the peer, which writes here: not outdated`);
    if (this.meta.disk !== 'UpToDate') return this.status();
    this.meta.disk = 'Outdated';
    this.persistMeta();
    this.log.warn({ volume: this.config.name }, 'volume: disk marked Outdated at the primary\'s request (it writes alone): not promoted until resynced');
    this.emit('disk', this.meta.disk);
    this.updateGauges();
    return this.status();
  }

  // --- status ------------------------------------------------------------------------------

  status(): VolumeStatus {
    const peer = this.link?.decided && this.link.peerState ? { name: this.link.peerState.name, role: this.link.peerState.role, disk: this.link.peerState.disk } : null;
    const outOfSyncBytes = this.meta.bitmap.setCount * BLOCK_SIZE;
    let resync: VolumeStatus['resync'] = null;
    if (this.resyncState) {
      const rate = this.rateWindow.rate;
      resync = {
        direction: this.resyncState.direction,
        totalBytes: this.resyncState.totalBytes,
        bytesLeft: outOfSyncBytes,
        rateBytesPerSec: Math.round(rate),
        etaSec: rate > 0 ? Math.round((outOfSyncBytes / rate) * 10) / 10 : null,
      };
    }
    return {
      name: this.config.name,
      node: this.nodeName,
      role: this.role,
      disk: this.meta.disk,
      connection: this.connection,
      protocol: this.config.protocol,
      splitBrain: this.splitBrain,
      peerFence: this.peerFence ? { since: this.peerFence.since, reason: this.peerFence.reason, failed: this.peerFence.failed } : null,
      sizeBytes: this.size,
      outOfSyncBytes,
      peer,
      resync,
      uuids: { ...this.meta.uuids, history: [...this.meta.uuids.history] as [string, string] },
      lastDecision: this.lastDecision,
      stats: { ...this.stats },
    };
  }

  private updateGauges(): void {
    const s = this.status();
    this.metrics.role.set(s.role === 'primary' ? 1 : 0);
    this.metrics.connected.set(s.connection === 'StandAlone' || s.connection === 'Connecting' ? 0 : 1);
    this.metrics.outOfSync.set(s.outOfSyncBytes);
    this.metrics.resyncRate.set(s.resync?.rateBytesPerSec ?? 0);
    this.metrics.resyncProgress.set(s.resync ? 1 - s.resync.bytesLeft / Math.max(1, s.resync.totalBytes) : 1);
    this.metrics.diskUpToDate.set(s.disk === 'UpToDate' ? 1 : 0);
    this.metrics.splitBrain.set(s.splitBrain ? 1 : 0);
    this.metrics.writesHeld.set(s.peerFence && !s.peerFence.failed ? 1 : 0);
  }

  // --- metadata ----------------------------------------------------------------------------

  private persistMeta(): void {
    try {
      // A secondary replicating normally marks its metadata dirty with every write (clearing bits
      // that were clear already), so the timer would rewrite an identical file every second: two
      // fsyncs and a rename, synchronous on this thread, on the disk the replicated writes need.
      const encoded = encodeMetadata(this.meta);
      if (!this.persistedMeta?.equals(encoded)) {
        // Unknown until this write completes: one that fails after its rename has replaced the file.
        this.persistedMeta = null;
        writeMetadata(this.config.metaFile, this.meta, encoded);
        this.persistedMeta = encoded;
      }
      this.metaDirty = false;
    } catch (err) {
      this.diskFailed(err);
    }
  }

  private async flushMetaIfDirty(): Promise<void> {
    this.updateGauges();
    if (!this.metaDirty || this.closed) return;
    // Data first: a bit is only cleared on disk once the block it covers is durable.
    await this.dev.flush().catch(() => undefined);
    this.persistMeta();
  }

  // --- the link ----------------------------------------------------------------------------

  private splitHostPort(hp: string): { host: string; port: number } {
    const i = hp.lastIndexOf(':');
    return { host: hp.slice(0, i).replace(/^\[|\]$/g, ''), port: Number(hp.slice(i + 1)) };
  }

  /** The node with the lower address dials; the other only accepts (no crossed connections). */
  private get dials(): boolean {
    return this.config.listen < this.config.peer;
  }

  private async startLink(): Promise<void> {
    const { host, port } = this.splitHostPort(this.config.listen);
    // Paused: an accepted connection is taken over by a socket that reads into our own buffers
    // (see ownedReads) before any byte is read.
    this.server = net.createServer({ pauseOnConnect: true }, (socket) => this.accepted(socket));
    this.server.on('error', (err) => this.log.error({ err: err.message }, 'volume: replication listener error'));
    await new Promise<void>((resolve, reject) => {
      this.server!.once('error', reject);
      this.server!.listen(port, host, () => {
        this.server!.off('error', reject);
        resolve();
      });
    });
    this.log.info({ volume: this.config.name, listen: this.config.listen, peer: this.config.peer, protocol: this.config.protocol }, 'volume: replication link listening');
    this.pingTimer = setInterval(() => this.tick(), this.config.pingIntervalMs);
    this.pingTimer.unref();
    this.scheduleConnect(0);
  }

  get replicationAddress(): net.AddressInfo | null {
    const a = this.server?.address();
    return a && typeof a === 'object' ? a : null;
  }

  private scheduleConnect(delay: number): void {
    if (!this.dials || this.closed || this.reconnectTimer || this.link || this.connection === 'StandAlone') return;
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null;
      this.dial();
    }, delay);
    this.reconnectTimer.unref();
  }

  private dial(): void {
    if (this.link || this.closed || this.connection === 'StandAlone') return;
    const { host, port } = this.splitHostPort(this.config.peer);
    const decoder = this.newDecoder();
    const socket = net.connect({ host, port, onread: this.ownedReads(decoder) });
    const timer = setTimeout(() => socket.destroy(new Error('connect timeout')), this.config.connectTimeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      this.startHandshake(socket, decoder);
    });
    socket.once('error', () => {
      clearTimeout(timer);
      if (!this.link || this.link.socket === socket) this.scheduleConnect(this.config.reconnectMs);
    });
  }

  private accepted(socket: net.Socket): void {
    if (this.closed || this.link || this.connection === 'StandAlone') {
      socket.destroy();
      return;
    }
    // Node gives `onread` (reads into buffers the caller owns) only to sockets it makes itself, not
    // to accepted ones: the accepted connection's handle is moved into such a socket, as Node's own
    // server does it (net.Socket's `handle` option). The paused socket has read nothing yet. Where
    // the handle is not there to move (another Node), the connection is read as 'data' events.
    const handle = (socket as unknown as { _handle?: { useUserBuffer?: unknown } | null })._handle;
    if (handle && typeof handle.useUserBuffer === 'function') {
      (socket as unknown as { _handle: unknown })._handle = null;
      socket.destroy(); // frees nothing but the server's count of this connection
      const decoder = this.newDecoder();
      const owned = new net.Socket({ handle, readable: true, writable: true, onread: this.ownedReads(decoder) } as net.SocketConstructorOpts);
      this.startHandshake(owned, decoder);
      return;
    }
    socket.resume();
    this.startHandshake(socket, new FrameDecoder());
  }

  private newDecoder(): FrameDecoder {
    return new FrameDecoder(MAX_PAYLOAD, (type, length) => this.payloadTargets(type, length));
  }

  /**
   * Where a received frame's payload goes. A DATA frame's blocks, on a secondary with a direct
   * disk, go into an aligned buffer of the device's pool: read there straight from the socket, and
   * written from there (no copy, and no fresh buffer per socket read for V8 to collect). The buffer
   * goes back to the pool once the write is done (onPeerWrite). Anything else: a fresh buffer.
   */
  private payloadTargets(type: FrameType, length: number): Buffer[] | null {
    if (type !== FrameType.Data || length <= 8 || length - 8 > DIRECT_CHUNK || this.role !== 'secondary' || !this.link?.authenticated) return null;
    const slot = this.dev.takeAligned();
    return slot ? [Buffer.allocUnsafe(8), slot.subarray(0, length - 8)] : null;
  }

  /** net.Socket `onread` options: the socket reads into the decoder's buffers; 'data' is not emitted. */
  private ownedReads(decoder: FrameDecoder): { buffer: () => Buffer; callback: (n: number, buf: Buffer) => boolean } {
    return {
      buffer: () => decoder.readBuffer(),
      callback: (n, buf) => {
        const link = this.link;
        // Not the current link's: a link already dropped, its socket closing.
        if (link && link.decoder === decoder) this.onFrames(link, () => decoder.received(buf, n));
        return true;
      },
    };
  }

  private startHandshake(socket: net.Socket, decoder: FrameDecoder): void {
    if (this.link) {
      socket.destroy();
      return;
    }
    socket.setNoDelay(true);
    socket.setKeepAlive(true, 1000);
    const link: Link = {
      socket,
      decoder,
      sendSeq: 0,
      myNonce: randomBytes(32).toString('hex'),
      peerHello: null,
      authSent: false,
      authenticated: false,
      peerState: null,
      peerBitmap: null,
      lastHeard: Date.now(),
      decided: false,
      closed: false,
      handshakeTimer: null,
      held: null,
    };
    this.link = link;
    link.handshakeTimer = setTimeout(() => this.dropLink(link, 'handshake timed out'), Math.max(2000, this.config.connectTimeoutMs * 2));
    socket.on('data', (chunk: Buffer) => this.onData(link, chunk));
    socket.on('error', (err) => this.dropLink(link, `socket error: ${err.message}`));
    socket.on('close', () => this.dropLink(link, link.decoder.pending ? `peer closed the link mid-frame (${link.decoder.pending} bytes pending)` : 'peer closed the link'));
    const hello: Hello = { proto: 1, volume: this.config.name, node: this.nodeName, sizeBytes: this.size, nonce: link.myNonce };
    this.send(link, FrameType.Hello, 0, encodeJson(hello));
  }

  private send(link: Link, type: FrameType, seq: number, payload?: Buffer | Buffer[]): void {
    if (link.closed) return;
    const frameSeq = seq || ++link.sendSeq;
    // Behind held frames, never before them: the peer sees frames in the order they were sent.
    if (link.held) link.held.push({ type, seq: frameSeq, payload });
    else this.writeFrames(link, [{ type, seq: frameSeq, payload }]);
  }

  /**
   * Sends a frame at the end of this tick, after the block device has handed the writes issued
   * in this tick to the I/O threads (FileBlockDevice.write defers that by one tick; its
   * process.nextTick was queued before this one, and ticks run in order). Frames sent meanwhile
   * queue behind it.
   */
  private sendAfterLocalWrites(link: Link, frame: OutFrame): void {
    if (link.closed) {
      frame.sent?.();
      return;
    }
    if (!link.held) {
      link.held = [];
      process.nextTick(() => this.sendHeld(link));
    }
    link.held.push(frame);
  }

  private sendHeld(link: Link): void {
    const frames = link.held;
    link.held = null;
    if (!frames) return;
    if (link.closed) {
      for (const f of frames) f.sent?.();
      return;
    }
    // DATA frames leaving together: all but the last say MORE, so that the peer writes them as
    // they arrive and makes them durable with one flush after the last (instead of a flush each).
    const lastData = frames.findLastIndex((f) => f.type === FrameType.Data);
    for (let i = 0; i < lastData; i++) if (frames[i]!.type === FrameType.Data) frames[i]!.flags = FLAG_MORE;
    try {
      this.writeFrames(link, frames);
    } catch (err) {
      // encodeFrame refuses a payload over the limit; write() never builds one, so this is a bug.
      this.dropLink(link, `could not send a frame: ${(err as Error).message}`);
      for (const f of frames) f.sent?.();
    }
  }

  private writeFrames(link: Link, frames: readonly OutFrame[]): void {
    link.socket.cork();
    for (const f of frames) {
      const parts = encodeFrame(f.type, f.seq, f.payload, f.flags);
      // The socket calls back once the last part is in the kernel, or with an error when it is destroyed first.
      for (let i = 0; i < parts.length; i++) link.socket.write(parts[i]!, i === parts.length - 1 ? f.sent : undefined);
    }
    link.socket.uncork();
  }

  private reject(link: Link, reason: string, detail: string): void {
    this.stats.framesRejected++;
    this.metrics.framesRejected(reason);
    this.dropLink(link, `${reason}: ${detail}`);
  }

  private onData(link: Link, chunk: Buffer): void {
    this.onFrames(link, () => link.decoder.push(chunk));
  }

  /** Takes the frames `decode` completes (ProtocolError: a bad frame, the link is dropped) and handles them in order. */
  private onFrames(link: Link, decode: () => Frame[]): void {
    if (link.closed) return;
    let frames: Frame[];
    try {
      frames = decode();
    } catch (err) {
      this.reject(link, 'bad-frame', (err as Error).message);
      return;
    }
    link.lastHeard = Date.now();
    for (const f of frames) {
      if (link.closed) return;
      try {
        this.onFrame(link, f);
      } catch (err) {
        this.reject(link, err instanceof ProtocolError ? 'protocol' : 'error', (err as Error).message);
        return;
      }
    }
  }

  private onFrame(link: Link, f: Frame): void {
    if (!link.authenticated) {
      if (f.type === FrameType.Hello) {
        if (link.peerHello) throw new ProtocolError('second HELLO');
        const hello = decodeJson<Hello>(f.payload, 'HELLO');
        if (hello.proto !== 1 || typeof hello.nonce !== 'string' || hello.nonce.length !== 64) throw new ProtocolError('malformed HELLO');
        if (hello.volume !== this.config.name) throw new ProtocolError(`peer serves volume ${hello.volume}, not ${this.config.name}`);
        if (hello.sizeBytes !== this.size) throw new ProtocolError(`peer volume is ${hello.sizeBytes} bytes, this one ${this.size}`);
        link.peerHello = hello;
        this.send(link, FrameType.Auth, 0, authResponse(this.config.secret, this.config.name, hello.nonce, link.myNonce));
        link.authSent = true;
        return;
      }
      if (f.type === FrameType.Auth && link.peerHello) {
        const expected = authResponse(this.config.secret, this.config.name, link.myNonce, link.peerHello.nonce);
        if (!authMatches(expected, f.payload)) {
          this.stats.framesRejected++;
          this.metrics.framesRejected('auth');
          this.dropLink(link, 'peer failed the HMAC handshake (wrong secret, or not our peer)');
          return;
        }
        link.authenticated = true;
        if (link.handshakeTimer) clearTimeout(link.handshakeTimer);
        this.log.info({ volume: this.config.name, peer: link.peerHello.node }, 'volume: peer authenticated');
        this.sendState(true);
        return;
      }
      throw new ProtocolError(`frame type ${f.type} before the handshake finished`);
    }
    switch (f.type) {
      case FrameType.State: {
        const st = decodeJson<PeerState>(f.payload, 'STATE');
        link.peerState = st;
        if (!link.decided) {
          if (link.peerBitmap) this.decide(link);
        } else {
          if (st.verifyResync) this.becomeTarget(link, 'verify');
          this.emit('peer', st);
        }
        return;
      }
      case FrameType.Bitmap: {
        const want = Math.ceil(this.size / BLOCK_SIZE / 8);
        if (f.payload.length !== want) throw new ProtocolError(`bitmap of ${f.payload.length} bytes, expected ${want}`);
        link.peerBitmap = new Uint8Array(f.payload);
        if (link.decided) {
          // After a verify: the peer's marks are blocks we are about to receive.
          this.meta.bitmap.merge(link.peerBitmap);
          this.metaDirty = true;
          return;
        }
        if (link.peerState) this.decide(link);
        return;
      }
      case FrameType.Data:
        return this.onPeerWrite(link, f, false);
      case FrameType.ResyncData:
        return this.onPeerWrite(link, f, true);
      case FrameType.RecvAck: {
        const seq = decodeSeq(f.payload);
        const p = this.pending.get(seq);
        if (!p || p.needsPeer !== 'recv') return;
        this.pending.delete(seq);
        p.done();
        return;
      }
      case FrameType.WriteAck: {
        // One frame acknowledges every write that one flush on the peer made durable.
        for (const seq of decodeSeqs(f.payload)) {
          const p = this.pending.get(seq);
          if (!p) continue;
          this.pending.delete(seq);
          p.done();
        }
        return;
      }
      case FrameType.NegAck: {
        // The peer could not write the block: it stays out of sync until the next resync.
        const seq = decodeSeq(f.payload);
        const p = this.pending.get(seq);
        if (p) {
          this.pending.delete(seq);
          this.meta.bitmap.setRange(p.first, p.blocks);
          this.metaDirty = true;
          p.done();
        }
        return;
      }
      case FrameType.ResyncAck: {
        const r = decodeRange(f.payload);
        if (this.resyncState?.direction !== 'source') return;
        this.resyncState.inFlight -= r.count;
        // Cleared only now: a block sent but never acknowledged stays out of sync.
        this.meta.bitmap.clearRange(r.offset / BLOCK_SIZE, r.count / BLOCK_SIZE);
        this.metaDirty = true;
        for (const w of this.resyncState.ackWaiters.splice(0)) w();
        return;
      }
      case FrameType.ResyncDone:
        return this.onResyncDone(link, decodeJson<{ uuids: Uuids }>(f.payload, 'RESYNC DONE').uuids);
      case FrameType.VerifyRequest: {
        const r = decodeRange(f.payload);
        if (r.offset % BLOCK_SIZE !== 0 || r.offset + r.count * BLOCK_SIZE > this.size) throw new ProtocolError(`verify range ${r.offset}+${r.count} blocks is past the volume`);
        this.answerVerify(link, f.seq, r.offset, r.count).catch((err) => this.dropLink(link, `verify: ${(err as Error).message}`));
        return;
      }
      case FrameType.VerifyReply: {
        const w = this.verifyWaiters.get(f.seq);
        if (w) {
          this.verifyWaiters.delete(f.seq);
          w(f.payload);
        }
        return;
      }
      case FrameType.PromoteRequest:
        this.onPromoteRequest(link);
        return;
      case FrameType.PromoteReply: {
        const a = decodeJson<{ granted: boolean; reason: string }>(f.payload, 'PROMOTE REPLY');
        if (typeof a?.granted !== 'boolean') throw new ProtocolError('malformed PROMOTE REPLY');
        const reply = this.promoteReply;
        if (!reply || this.promoting !== 'asking') return;
        // Set here, synchronously: a request from the peer in the same chunk is now refused.
        if (a.granted) this.promoting = 'granted';
        reply({ granted: a.granted, reason: String(a.reason) });
        return;
      }
      case FrameType.Ping:
        this.send(link, FrameType.Pong, 0);
        return;
      case FrameType.Pong:
        return;
      case FrameType.Disconnect:
        this.dropLink(link, `peer disconnected: ${decodeJson<{ reason: string }>(f.payload, 'DISCONNECT').reason}`);
        return;
      default:
        throw new ProtocolError(`unexpected frame type ${f.type}`);
    }
  }

  private myState(extra: Partial<PeerState> = {}): PeerState {
    return {
      name: this.nodeName,
      role: this.role,
      disk: this.meta.disk,
      uuids: this.meta.uuids,
      primaryCrashed: this.meta.flags.primaryCrashed,
      primarySince: this.meta.primarySince,
      changes: this.meta.bitmap.setCount,
      discardMyData: this.discardMyData,
      ...extra,
    };
  }

  private sendState(withBitmap = false, extra: Partial<PeerState> = {}): void {
    const link = this.link;
    if (!link?.authenticated) return;
    this.send(link, FrameType.State, 0, encodeJson(this.myState(extra)));
    if (withBitmap) this.send(link, FrameType.Bitmap, 0, Buffer.from(this.meta.bitmap.bits));
  }

  /** Both sides run this on the same pair of states and reach mirror-image decisions. */
  private decide(link: Link): void {
    try {
      this.decideOnce(link);
    } finally {
      // A promotion that waited for this handshake goes on now, with the outcome in place.
      this.linkSettled();
    }
  }

  private decideOnce(link: Link): void {
    const peer = link.peerState!;
    link.decided = true;
    const self = this.myState();
    let { decision, rule } = compareUuids(
      { uuids: self.uuids, primaryCrashed: self.primaryCrashed, name: self.name },
      { uuids: peer.uuids, primaryCrashed: peer.primaryCrashed, name: peer.name },
    );
    if (this.role === 'primary' && peer.role === 'primary') {
      decision = 'split-brain';
      rule = 200;
    }
    if (peer.disk === 'Failed' || this.meta.disk === 'Failed') decision = 'no-sync';
    // An Inconsistent side (a resync cut short) never serves as a source.
    if (this.meta.disk === 'Inconsistent' && (decision === 'source' || decision === 'source-full' || decision === 'no-sync') && peer.disk === 'UpToDate') decision = 'target';
    if (peer.disk === 'Inconsistent' && (decision === 'target' || decision === 'target-full' || decision === 'no-sync') && this.meta.disk === 'UpToDate') decision = 'source';
    // Neither side UpToDate (and not two fresh volumes): no side may serve as a source.
    const stale = (d: DiskState) => d === 'Inconsistent' || d === 'Outdated';
    if (stale(this.meta.disk) && stale(peer.disk) && rule !== 10 && decision !== 'unrelated') {
      this.lastDecision = { decision, rule };
      this.log.error({ volume: this.config.name, decision, rule, self: this.meta.disk, peer: peer.disk }, 'volume: neither node has UpToDate data');
      this.connection = 'StandAlone';
      this.dropLink(link, `neither node is UpToDate (here ${this.meta.disk}, peer ${peer.disk}): promote the node with the good data with --force, then connect`, true);
      this.emit('connection', this.connection);
      return;
    }
    this.lastDecision = { decision, rule };
    this.log.info({ volume: this.config.name, decision, rule, self: self.uuids, peer: peer.uuids }, 'volume: connected; UUIDs compared');

    if (decision === 'split-brain' || (this.discardMyData !== peer.discardMyData && decision !== 'unrelated')) {
      const victim = this.discardMyData !== peer.discardMyData
        ? (this.discardMyData ? 'self' : 'peer')
        : splitBrainVictim(
            { changes: self.changes, primary: self.role === 'primary', primarySince: self.primarySince, name: self.name },
            { changes: peer.changes, primary: peer.role === 'primary', primarySince: peer.primarySince, name: peer.name },
            { afterSb0Pri: this.config.afterSb0Pri, afterSb1Pri: this.config.afterSb1Pri },
          );
      if (decision === 'split-brain') {
        this.metrics.splitBrains.inc();
        this.log.error({ volume: this.config.name, rule, victim, policy: { afterSb0Pri: this.config.afterSb0Pri, afterSb1Pri: this.config.afterSb1Pri } }, 'volume: SPLIT BRAIN detected');
      }
      if (victim === null) {
        this.splitBrain = true;
        this.connection = 'StandAlone';
        this.dropLink(link, 'split brain: waiting for the operator (pairgate volume resolve --discard-my-data on the node to discard)', true);
        this.emit('connection', this.connection);
        return;
      }
      if (victim === 'self' && this.role === 'primary') {
        this.splitBrain = true;
        this.connection = 'StandAlone';
        this.dropLink(link, 'split brain: this primary would be discarded; demote it first', true);
        this.emit('connection', this.connection);
        return;
      }
      this.log.warn({ volume: this.config.name, discarded: victim === 'self' ? 'this node' : 'the peer' }, 'volume: split brain resolved by policy: the changes of one side are discarded');
      this.splitBrain = false;
      if (victim === 'self') this.becomeTarget(link, 'split-brain');
      else void this.runResyncSource(link, false);
      return;
    }
    switch (decision) {
      case 'unrelated':
        this.connection = 'StandAlone';
        this.dropLink(link, 'peer has unrelated data (no common generation): refusing to connect; check the configuration', true);
        this.emit('connection', this.connection);
        return;
      case 'no-sync':
      {
        const fresh = rule === 10 && this.meta.disk !== 'UpToDate';
        if (rule === 10) {
          // Two fresh volumes: identical by definition (DRBD's new-current-uuid --clear-bitmap);
          // both leave the "just created" state UpToDate with the same first generation, derived
          // from the handshake's two nonces (no extra round trip).
          const nonces = [link.myNonce, link.peerHello!.nonce].sort().join('');
          this.meta.uuids = { current: createHash('sha256').update(nonces).digest('hex').slice(0, 16), bitmap: NO_UUID, history: [NO_UUID, NO_UUID] };
          this.meta.disk = 'UpToDate';
          this.meta.flags.consistent = true;
          // The peer decides the same from the same two states: it is UpToDate as well.
          peer.disk = 'UpToDate';
        }
        // Outdated at a primary's request, yet nothing was written meanwhile: the same data.
        const wasOutdated = this.meta.disk === 'Outdated' && peer.disk === 'UpToDate';
        if (wasOutdated) this.meta.disk = 'UpToDate';
        this.meta.bitmap.clearAll();
        this.meta.flags.primaryCrashed = this.role === 'primary';
        this.persistMeta();
        // Every field is final before anyone hears of it: a listener (the pair agent) may
        // promote at once, and must then see a connected, UpToDate volume of the shared generation.
        this.setConnection('Connected');
        if (fresh) {
          this.log.info({ volume: this.config.name, uuid: this.meta.uuids.current }, 'volume: two fresh volumes met: both UpToDate, no initial sync');
          this.emit('disk', this.meta.disk);
          this.updateGauges();
        }
        if (wasOutdated) {
          this.log.info({ volume: this.config.name }, 'volume: connected with nothing to sync: Outdated data is UpToDate again');
          this.sendState();
          this.emit('disk', this.meta.disk);
          this.updateGauges();
        }
        return;
      }
      case 'source':
      case 'source-full':
        void this.runResyncSource(link, decision === 'source-full');
        return;
      case 'target':
      case 'target-full':
        if (this.role === 'primary') {
          this.connection = 'StandAlone';
          this.dropLink(link, 'the peer has newer data but this node is primary: refusing to become a sync target', true);
          this.emit('connection', this.connection);
          return;
        }
        this.becomeTarget(link, decision);
        return;
      default:
        return;
    }
  }

  private setConnection(c: ConnectionState): void {
    if (this.connection === c) return;
    this.connection = c;
    if (c === 'Connected') {
      // Connected (after any resync): the peer has every write: nothing to hold for.
      if (this.meta.flags.peerWasOutdated) {
        this.meta.flags.peerWasOutdated = false;
        this.metaDirty = true;
      }
      this.releaseWrites('the peer is connected again');
    }
    this.log.info({ volume: this.config.name, connection: c }, 'volume: connection state');
    this.emit('connection', c);
    this.updateGauges();
  }

  // --- resync ------------------------------------------------------------------------------

  private becomeTarget(link: Link, why: string): void {
    const full = why === 'target-full' || (why === 'split-brain' && this.lastDecision?.rule === 100);
    if (full) this.meta.bitmap.setAll();
    else if (link.peerBitmap) this.meta.bitmap.merge(link.peerBitmap);
    this.meta.disk = 'Inconsistent';
    this.meta.flags.consistent = false;
    this.persistMeta();
    this.resyncState = { direction: 'target', totalBytes: this.meta.bitmap.setCount * BLOCK_SIZE, startedAt: Date.now(), sent: 0, inFlight: 0, ackWaiters: [] };
    this.rateWindow = { at: Date.now(), bytes: 0, rate: 0 };
    this.log.info({ volume: this.config.name, why, bytes: this.resyncState.totalBytes }, 'volume: sync target (Inconsistent until done)');
    this.setConnection('SyncTarget');
    this.emit('disk', this.meta.disk);
    this.emit('sync', this.status().resync);
  }

  private async runResyncSource(link: Link, full: boolean): Promise<void> {
    const bm = this.meta.bitmap;
    // The peer turns sync target (Inconsistent) on the same decision; its STATE says so shortly.
    if (link.peerState) link.peerState.disk = 'Inconsistent';
    if (full) bm.setAll();
    else if (link.peerBitmap) bm.merge(link.peerBitmap);
    this.metaDirty = true;
    this.resyncState = { direction: 'source', totalBytes: bm.setCount * BLOCK_SIZE, startedAt: Date.now(), sent: 0, inFlight: 0, ackWaiters: [] };
    this.rateWindow = { at: Date.now(), bytes: 0, rate: 0 };
    this.setConnection('SyncSource');
    this.log.info({ volume: this.config.name, bytes: this.resyncState.totalBytes, full }, 'volume: sync source');
    this.emit('sync', this.status().resync);
    const blocks = this.size / BLOCK_SIZE;
    const rate = this.config.resyncRateBytesPerSec;
    const state = this.resyncState;
    try {
      let cursor = 0;
      for (;;) {
        if (link.closed || this.link !== link) return;
        const first = bm.next(cursor);
        if (first < 0) {
          // Everything sent: wait for the acks; blocks re-marked meanwhile start another pass.
          while (state.inFlight > 0 && !link.closed) await new Promise<void>((r) => state.ackWaiters.push(r));
          if (link.closed) return;
          if (bm.setCount === 0) break;
          cursor = 0;
          continue;
        }
        let n = 1;
        while (n < RESYNC_RUN_BLOCKS && first + n < blocks && bm.get(first + n)) n++;
        cursor = first + n;
        while (state.inFlight >= RESYNC_WINDOW_BYTES && !link.closed) await new Promise<void>((r) => state.ackWaiters.push(r));
        // Rate limit: never ahead of rate × elapsed.
        const due = state.startedAt + (state.sent / rate) * 1000;
        if (due > Date.now()) await new Promise((r) => setTimeout(r, Math.min(1000, due - Date.now())));
        let data: Buffer;
        try {
          data = await this.dev.read(first * BLOCK_SIZE, n * BLOCK_SIZE);
        } catch (err) {
          this.diskFailed(err);
          this.dropLink(link, 'local disk failed during resync');
          return;
        }
        if (link.closed || this.link !== link) return;
        // A write that started after the run was chosen cleared its blocks' bits and sent them
        // itself; only blocks still marked go out, as runs of consecutive blocks.
        let i = 0;
        while (i < n) {
          if (!bm.get(first + i)) {
            i++;
            continue;
          }
          let j = i;
          while (j < n && bm.get(first + j)) j++;
          const offset = (first + i) * BLOCK_SIZE;
          const chunk = data.subarray(i * BLOCK_SIZE, j * BLOCK_SIZE);
          this.send(link, FrameType.ResyncData, 0, encodeBlockWrite(offset, chunk));
          state.inFlight += chunk.length;
          state.sent += chunk.length;
          this.stats.resyncBytesSent += chunk.length;
          this.metrics.bytesSent('resync', chunk.length);
          this.countRate(chunk.length);
          i = j;
        }
      }
      this.meta.uuids = retireBitmapUuid(this.meta.uuids);
      if (this.role !== 'primary') this.meta.flags.primaryCrashed = false;
      this.persistMeta();
      this.send(link, FrameType.ResyncDone, 0, encodeJson({ uuids: this.meta.uuids }));
      this.log.info({ volume: this.config.name, bytes: state.totalBytes, ms: Date.now() - state.startedAt }, 'volume: resync done (source)');
      this.resyncState = null;
      this.setConnection('Connected');
      this.emit('sync', null);
    } catch (err) {
      this.log.error({ err: (err as Error).message }, 'volume: resync failed');
      this.dropLink(link, 'resync failed');
    }
  }

  private countRate(bytes: number): void {
    const w = this.rateWindow;
    w.bytes += bytes;
    const now = Date.now();
    if (now - w.at >= 500) {
      w.rate = (w.bytes * 1000) / (now - w.at);
      w.at = now;
      w.bytes = 0;
    }
  }

  private onPeerWrite(link: Link, f: Frame, resync: boolean): void {
    if (this.role === 'primary') throw new ProtocolError('peer sent a write to a primary (two primaries?)');
    // The block bytes stay as views of the received chunks: written with one pwritev, not joined.
    const { offset, data, length } = decodeBlockWriteParts(f);
    if (offset % BLOCK_SIZE !== 0 || length % BLOCK_SIZE !== 0 || length === 0) throw new ProtocolError(`unaligned write ${offset}+${length}`);
    if (offset + length > this.size) throw new ProtocolError(`write ${offset}+${length} is past the end of the volume (${this.size})`);
    if (resync && this.connection !== 'SyncTarget') throw new ProtocolError('resync data while not a sync target');
    const seq = f.seq;
    // MORE: the primary sent further DATA frames with this one; the flush waits for the last of them.
    const more = !resync && (f.flags & FLAG_MORE) !== 0;
    if (!resync && this.config.protocol === 'B') this.send(link, FrameType.RecvAck, 0, encodeSeq(seq));
    // One queue keeps the peer's order: a later write to a block always lands last.
    if (!resync) this.queuedData++;
    this.enqueueApply(link, async () => {
      if (!resync) {
        this.queuedData--;
        this.moreFrom = more ? link : null;
      }
      if (this.meta.disk === 'Failed') {
        this.dev.releaseAligned(data[0]!);
        if (!resync) this.send(link, FrameType.NegAck, 0, encodeSeq(seq));
        return;
      }
      // Protocol C with nothing else queued, flushing or announced (MORE): one O_DSYNC write (one
      // trip to the I/O threads, not two). Otherwise write now and share the next fdatasync.
      const durableNow = !resync && !more && this.config.protocol === 'C' && this.applyQueued === 1 && this.unflushed.length === 0 && this.dev.idle;
      try {
        if (durableNow) await this.dev.writeDurable(offset, data);
        else await this.dev.writeNoSync(offset, data);
      } catch (err) {
        this.diskFailed(err);
        if (!resync) this.send(link, FrameType.NegAck, 0, encodeSeq(seq));
        return;
      } finally {
        // The buffer the frame was read into (when it was one of the device's aligned ones) is free again.
        this.dev.releaseAligned(data[0]!);
      }
      this.meta.bitmap.clearRange(offset / BLOCK_SIZE, length / BLOCK_SIZE);
      this.metaDirty = true;
      if (resync) {
        this.stats.resyncBytesReceived += length;
        this.countRate(length);
        this.send(link, FrameType.ResyncAck, 0, encodeRange(offset, length));
      } else if (durableNow) {
        this.ackWrite(link, seq);
      } else if (this.config.protocol === 'C') {
        // Writes that arrive together (one large write sent as several frames) share one
        // fdatasync: the flush waits while more data writes are queued right behind, for at most
        // 64 writes or 4 MiB, so that a streaming primary still sees its acks come in steps.
        this.unflushed.push({ link, seq });
        this.unflushedBytes += length;
        if ((this.queuedData === 0 && !more) || this.unflushed.length >= 64 || this.unflushedBytes >= 4 * 1024 * 1024) this.flushApplied();
      }
    });
  }

  /** One fdatasync for the protocol C writes applied since the last, then their acks. */
  private flushApplied(): void {
    const applied = this.unflushed;
    this.unflushed = [];
    this.unflushedBytes = 0;
    this.dev.flush().then(
      () => {
        for (const { link, seq } of applied) this.ackWrite(link, seq);
      },
      (err) => {
        this.diskFailed(err);
        for (const { link, seq } of applied) this.send(link, FrameType.NegAck, 0, encodeSeq(seq));
      },
    );
  }

  /** Runs `step` after every earlier peer write; a failure drops the link (never an unhandled rejection). */
  private enqueueApply(link: Link, step: () => Promise<void>): void {
    this.applyQueued++;
    this.applyChain = this.applyChain
      .then(step)
      .catch((err: unknown) => {
        this.log.error({ volume: this.config.name, err: (err as Error).message }, 'volume: applying a peer frame failed');
        this.dropLink(link, `apply failed: ${(err as Error).message}`);
      })
      .finally(() => {
        // The last queued step flushes for every write applied before it (any kind of step: a
        // resync block or a refused write behind a data write must not leave it unacknowledged),
        // unless the last DATA frame said MORE and its link is up: the frame after it flushes.
        if (this.applyQueued === 1 && this.unflushed.length && !(this.moreFrom && !this.moreFrom.closed)) this.flushApplied();
        this.applyQueued--;
      });
  }

  /**
   * Acknowledges a durable peer write. The writes one fdatasync made durable resolve together,
   * so their acks are gathered until the end of this microtask run and leave as one frame.
   */
  private ackWrite(link: Link, seq: number): void {
    this.ackBatch.push(seq);
    if (this.ackBatch.length > 1) return;
    queueMicrotask(() => {
      const seqs = this.ackBatch;
      this.ackBatch = [];
      this.send(link, FrameType.WriteAck, 0, encodeSeqs(seqs));
    });
  }

  private onResyncDone(link: Link, uuids: Uuids): void {
    if (this.connection !== 'SyncTarget') throw new ProtocolError('RESYNC DONE while not a sync target');
    this.enqueueApply(link, async () => {
      if (link.closed) return;
      await this.dev.flush();
      if (this.meta.bitmap.setCount !== 0) {
        this.log.error({ left: this.meta.bitmap.setCount }, 'volume: resync ended with blocks still out of sync; staying Inconsistent');
        this.dropLink(link, 'incomplete resync');
        return;
      }
      this.meta.uuids = { current: uuids.current, bitmap: NO_UUID, history: [...uuids.history] as [string, string] };
      this.meta.disk = 'UpToDate';
      this.meta.flags.consistent = true;
      this.meta.flags.primaryCrashed = false;
      this.discardMyData = false;
      this.splitBrain = false;
      this.persistMeta();
      this.log.info({ volume: this.config.name, ms: Date.now() - (this.resyncState?.startedAt ?? Date.now()) }, 'volume: resync done (target): UpToDate');
      this.resyncState = null;
      this.setConnection('Connected');
      // The source marked this disk Inconsistent when the resync began; tell it the disk is
      // UpToDate again, or its pair agent would refuse every hand-over to this node.
      this.sendState();
      this.emit('disk', this.meta.disk);
      this.emit('sync', null);
    });
  }

  // --- online verify -----------------------------------------------------------------------

  /**
   * Compares every block's digest with the peer's. Differences are marked out of sync and
   * resynced from this node at once (run it on the primary: its data wins).
   */
  async verify(onProgress?: (doneBlocks: number, totalBlocks: number) => void): Promise<{ checkedBlocks: number; outOfSyncBlocks: number }> {
    const link = this.link;
    if (!link?.decided || this.connection !== 'Connected') throw new ConflictError(`verify needs a connected peer with no resync running (connection: ${this.connection})`);
    if (this.role === 'secondary' && link.peerState?.role === 'primary') throw new ConflictError('run verify on the primary: the verifying node is the resync source');
    const blocks = this.size / BLOCK_SIZE;
    const marked = new Bitmap(blocks);
    let seq = 0;
    for (let first = 0; first < blocks; first += VERIFY_RUN_BLOCKS) {
      const n = Math.min(VERIFY_RUN_BLOCKS, blocks - first);
      const reqSeq = ++seq;
      const reply = new Promise<Buffer>((resolve, reject) => {
        const t = setTimeout(() => {
          this.verifyWaiters.delete(reqSeq);
          reject(new UnavailableError('verify: the peer did not answer'));
        }, 10_000);
        this.verifyWaiters.set(reqSeq, (d) => {
          clearTimeout(t);
          resolve(d);
        });
      });
      this.send(link, FrameType.VerifyRequest, reqSeq, encodeRange(first * BLOCK_SIZE, n));
      const local = await this.dev.read(first * BLOCK_SIZE, n * BLOCK_SIZE);
      const theirs = await reply;
      if (link.closed) throw new UnavailableError('verify: the link dropped');
      for (let i = 0; i < n; i++) {
        const mine = sha(local.subarray(i * BLOCK_SIZE, (i + 1) * BLOCK_SIZE));
        if (!mine.equals(theirs.subarray(i * 32, (i + 1) * 32))) marked.set(first + i);
      }
      onProgress?.(first + n, blocks);
    }
    this.stats.verifiedBlocks += blocks;
    this.stats.verifyOutOfSync += marked.setCount;
    this.metrics.verifyOutOfSync.inc(marked.setCount);
    this.log.info({ volume: this.config.name, blocks, outOfSync: marked.setCount }, 'volume: online verify finished');
    if (marked.setCount > 0 && this.connection === 'Connected') {
      this.meta.bitmap.merge(marked.bits);
      this.persistMeta();
      // Tell the peer first (it turns sync target for these blocks), then send them.
      this.send(link, FrameType.Bitmap, 0, Buffer.from(marked.bits));
      this.sendState(false, { verifyResync: true });
      link.peerBitmap = null;
      void this.runResyncSource(link, false);
    }
    return { checkedBlocks: blocks, outOfSyncBlocks: marked.setCount };
  }

  private async answerVerify(link: Link, seq: number, offset: number, count: number): Promise<void> {
    // Behind the queue of peer writes, so the digests reflect everything sent before the request.
    await this.applyChain;
    const data = await this.dev.read(offset, count * BLOCK_SIZE);
    const out = Buffer.alloc(count * 32);
    for (let i = 0; i < count; i++) sha(data.subarray(i * BLOCK_SIZE, (i + 1) * BLOCK_SIZE)).copy(out, i * 32);
    this.send(link, FrameType.VerifyReply, seq, out);
  }

  /**
   * SHA-256 of every block of the local data (any role: it reads the backing file, not the
   * store's view). For `pairgate volume digest`, tests and hand checks after a resync.
   */
  async blockDigests(): Promise<string[]> {
    await this.applyChain.catch(() => undefined);
    const out: string[] = [];
    const chunk = 256 * BLOCK_SIZE;
    for (let off = 0; off < this.size; off += chunk) {
      const data = await this.dev.read(off, Math.min(chunk, this.size - off));
      for (let i = 0; i < data.length; i += BLOCK_SIZE) out.push(sha(data.subarray(i, i + BLOCK_SIZE)).toString('hex').slice(0, 32));
    }
    return out;
  }

  // --- link loss ---------------------------------------------------------------------------

  private tick(): void {
    const link = this.link;
    if (!link || link.closed) return;
    if (Date.now() - link.lastHeard > this.config.pingTimeoutMs) {
      this.dropLink(link, `no frame from the peer for ${this.config.pingTimeoutMs} ms`);
      return;
    }
    if (link.authenticated) this.send(link, FrameType.Ping, 0);
  }

  private dropLink(link: Link, reason: string, tellPeer = false): void {
    if (link.closed) return;
    if (tellPeer && link.authenticated) this.send(link, FrameType.Disconnect, 0, encodeJson({ reason }));
    // Frames held for the end of the tick still leave, in order, before the end of the stream.
    if (link.held) this.sendHeld(link);
    link.closed = true;
    if (link.handshakeTimer) clearTimeout(link.handshakeTimer);
    if (this.moreFrom === link) {
      // The rest of a batch will not come: what was applied of it is flushed now (its acks go nowhere).
      this.moreFrom = null;
      if (this.applyQueued === 0 && this.unflushed.length) this.flushApplied();
    }
    link.socket.end();
    setTimeout(() => link.socket.destroy(), 200).unref();
    if (this.link !== link) return;
    this.link = null;
    const wasConnected = link.decided;
    if (wasConnected || link.authenticated) this.log.warn({ volume: this.config.name, reason }, 'volume: replication link lost');
    else this.log.warn({ volume: this.config.name, reason, remote: link.socket.remoteAddress }, 'volume: connection refused or failed before the handshake finished');
    if (wasConnected && this.role === 'primary' && !this.closed) this.holdWritesForPeer('replication link lost');
    // Writes the peer never confirmed: complete locally, out of sync until the next resync; with
    // fencing, acknowledged only once the peer cannot be promoted without them (and never when
    // the volume closes meanwhile).
    const fence = this.peerFence;
    const closing = this.closed && this.config.fencing === 'resource-and-stonith';
    for (const [seq, p] of this.pending) {
      this.pending.delete(seq);
      this.meta.bitmap.setRange(p.first, p.blocks);
      if (closing) p.fail(new UnavailableError(`volume ${this.config.name}: write not acknowledged: the volume closed before the peer confirmed it`));
      else if (fence?.failed) p.fail(new UnavailableError(`volume ${this.config.name}: write not acknowledged: the peer never confirmed it, and held writes have failed`));
      else if (fence) fence.held.push(p);
      else p.done();
    }
    for (const w of this.verifyWaiters.values()) w(Buffer.alloc(0));
    this.verifyWaiters.clear();
    // A promotion waiting for the peer's answer goes on alone (as if the link had dropped just before).
    this.promoteReply?.({ granted: true, reason: 'link lost: alone' });
    this.linkSettled();
    if (this.resyncState) {
      for (const w of this.resyncState.ackWaiters.splice(0)) w();
      this.resyncState = null;
    }
    if (wasConnected && this.role === 'primary') {
      // The peer may be gone for good: a new generation starts, the bitmap tracks it.
      this.meta.uuids = rotateUuids(this.meta.uuids);
      this.meta.primarySince = Date.now();
    }
    this.metaDirty = true;
    if (wasConnected) this.persistMeta();
    if (this.connection !== 'StandAlone') {
      this.setConnection('Connecting');
      this.scheduleConnect(this.config.reconnectMs);
    }
    this.updateGauges();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.outdateOnLeavingPrimary('closing');
    this.closed = true;
    this.failHeldWrites('the volume was closed');
    for (const t of [this.reconnectTimer, this.metaTimer]) if (t) clearTimeout(t);
    if (this.pingTimer) clearInterval(this.pingTimer);
    if (this.metaTimer) clearInterval(this.metaTimer);
    if (this.link) this.dropLink(this.link, 'volume closing', true);
    await new Promise<void>((r) => (this.server ? this.server.close(() => r()) : r()));
    await this.applyChain.catch(() => undefined);
    await this.dev.flush().catch(() => undefined);
    // A clean stop of a primary is a demotion: nothing in flight to resync.
    this.meta.flags.primaryCrashed = false;
    this.meta.activityLog = [];
    this.persistMeta();
    await this.al.write([]).catch(() => undefined);
    await this.al.close();
    await this.dev.close();
    this.emit('closed');
  }
}
