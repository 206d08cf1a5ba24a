/**
 * Heartbeat over UDP: every keepalive the node sends its signed view to each peer address (one
 * or more links), and tracks when it last heard a valid, fresh datagram from the peer. Any live
 * link keeps the peer alive; past warntime it logs and counts a warning, past deadtime it
 * declares the peer dead. Garbage, forged, replayed and foreign datagrams are dropped and
 * counted in pairgate_heartbeat_dropped_total{reason}; they never touch the membership.
 */
import dgram from 'node:dgram';
import { EventEmitter } from 'node:events';
import type { Logger } from '../../common/log.ts';
import { counter, type MetricsRegistry } from '../../common/metrics.ts';
import { decodeHeartbeat, decodeRequest, encodeHeartbeat, encodeRequest, isRequestDatagram, ReplayGuard, type HeartbeatRequest, type NodeView } from './heartbeat-codec.ts';
import type { NodeId } from './state-machine.ts';
import { other } from './state-machine.ts';

export interface HeartbeatTimings {
  keepaliveMs: number;
  warntimeMs: number;
  deadtimeMs: number;
  initdeadMs: number;
}

/** Defaults for a LAN: the peer is dead 600 ms after its last datagram, so failover stays under two seconds. */
export const DEFAULT_TIMINGS: HeartbeatTimings = { keepaliveMs: 100, warntimeMs: 300, deadtimeMs: 600, initdeadMs: 2000 };

export interface HeartbeatOptions extends HeartbeatTimings {
  pair: string;
  node: NodeId;
  key: Buffer;
  /** Local addresses (host:port), one socket each. */
  listen: string[];
  /** The peer's addresses (host:port). With as many as `listen`, link i is listen[i] <-> peers[i]. */
  peers: string[];
  view: () => NodeView;
  /** Requests to the peer, sent beside every view while returned (heartbeat-codec.ts); emitted on the peer as 'peer-request'. */
  requests?: () => HeartbeatRequest[];
  log: Logger;
  registry: MetricsRegistry;
  /** Generation of this start; defaults to the start time in ms (grows across restarts). */
  generation?: number;
}

export interface PeerStatus {
  alive: boolean;
  everSeen: boolean;
  view: NodeView | null;
  lastHeardAt: number | null;
  generation: number | null;
  links: Array<{ listen: string; peer: string; up: boolean }>;
}

export function splitHostPort(hp: string): { host: string; port: number } {
  const m = /^\[?([^\]]+?)\]?:(\d{1,5})$/.exec(hp);
  if (!m) throw new Error(`not host:port: ${hp}`);
  return { host: m[1]!, port: Number(m[2]) };
}

export class Heartbeat extends EventEmitter {
  readonly generation: number;
  private seq = 0;
  private sockets: dgram.Socket[] = [];
  private timer: NodeJS.Timeout | null = null;
  private readonly guard = new ReplayGuard();
  /** Requests have their own sequence and guard: one arriving first on a faster link must not make a view of a lower sequence a replay. */
  private requestSeq = 0;
  private readonly requestGuard = new ReplayGuard();
  private lastHeard: number | null = null;
  private linkHeard: number[];
  private peerView: NodeView | null = null;
  private alive = false;
  private everSeen = false;
  private warned = false;
  private lastMissCount = 0;
  private readonly dropped;
  private readonly misses;
  private readonly warnings;
  private readonly peerId: NodeId;

  constructor(private readonly opts: HeartbeatOptions) {
    super();
    this.generation = opts.generation ?? Date.now();
    this.peerId = other(opts.node);
    this.linkHeard = opts.listen.map(() => 0);
    this.dropped = counter(opts.registry, 'heartbeat_dropped_total', 'Heartbeat datagrams dropped, by reason', ['reason']);
    this.misses = counter(opts.registry, 'heartbeat_misses_total', 'Keepalive intervals that passed without a valid heartbeat from the peer');
    this.warnings = counter(opts.registry, 'heartbeat_warnings_total', 'Times the peer was silent past warntime');
    for (const r of ['short', 'oversize', 'bad-magic', 'forged', 'malformed', 'unknown-node', 'replay', 'duplicate']) this.dropped.inc({ reason: r }, 0);
  }

  async start(): Promise<void> {
    for (const [i, addr] of this.opts.listen.entries()) {
      const { host, port } = splitHostPort(addr);
      const sock = dgram.createSocket({ type: host.includes(':') ? 'udp6' : 'udp4', reuseAddr: false });
      sock.on('message', (msg, rinfo) => this.receive(i, msg, rinfo));
      sock.on('error', (err) => this.opts.log.warn({ err: err.message, listen: addr }, 'heartbeat socket error'));
      await new Promise<void>((resolve, reject) => {
        sock.once('error', reject);
        sock.bind(port, host, () => {
          sock.off('error', reject);
          resolve();
        });
      });
      this.sockets.push(sock);
    }
    const tick = Math.max(10, Math.floor(this.opts.keepaliveMs));
    this.timer = setInterval(() => {
      this.sendNow();
      this.check();
    }, tick);
    this.sendNow();
  }

  /** Sends the current view on every link now (called on each keepalive and on every change). */
  sendNow(): void {
    void this.send();
  }

  /** Sends the current view and resolves when every datagram has left (the last word before close). */
  send(): Promise<void> {
    if (this.sockets.length === 0) return Promise.resolve();
    this.seq += 1;
    const datagrams = [encodeHeartbeat(this.opts.key, { pair: this.opts.pair, node: this.opts.node, gen: this.generation, seq: this.seq, view: this.opts.view() })];
    for (const request of this.opts.requests?.() ?? []) {
      this.requestSeq += 1;
      datagrams.push(encodeRequest(this.opts.key, { pair: this.opts.pair, node: this.opts.node, gen: this.generation, seq: this.requestSeq, request }));
    }
    const paired = this.opts.peers.length === this.sockets.length;
    const sends: Array<Promise<void>> = [];
    for (const data of datagrams) {
      for (const [i, peer] of this.opts.peers.entries()) {
        const sock = paired ? this.sockets[i]! : this.sockets[0]!;
        const { host, port } = splitHostPort(peer);
        sends.push(
          new Promise<void>((resolve) => {
            sock.send(data, port, host, (err) => {
              if (err) this.opts.log.debug({ err: err.message, peer }, 'heartbeat send failed');
              resolve();
            });
          }),
        );
      }
    }
    return Promise.all(sends).then(() => undefined);
  }

  /** A decoded datagram that is also fresh by `guard`, or null (dropped and counted). */
  private accept<T extends { gen: number; seq: number }>(
    decoded: { ok: true; message: T } | { ok: false; reason: string },
    guard: ReplayGuard,
    rinfo: dgram.RemoteInfo,
  ): { message: T; restarted: boolean } | null {
    if (!decoded.ok) {
      this.drop(decoded.reason, rinfo);
      return null;
    }
    const fresh = guard.check(decoded.message);
    if (!fresh.ok) {
      this.drop(fresh.reason, rinfo);
      return null;
    }
    return { message: decoded.message, restarted: fresh.restarted };
  }

  private receive(link: number, msg: Buffer, rinfo: dgram.RemoteInfo): void {
    const expect = { pair: this.opts.pair, peer: this.peerId };
    if (isRequestDatagram(msg)) {
      // Signed and fresh like a view, but it says nothing about membership.
      const request = this.accept(decodeRequest(this.opts.key, msg, expect), this.requestGuard, rinfo);
      if (request && this.alive) this.emit('peer-request', request.message.request);
      return;
    }
    const accepted = this.accept(decodeHeartbeat(this.opts.key, msg, expect), this.guard, rinfo);
    if (!accepted) return;
    const { message, restarted } = accepted;
    const now = Date.now();
    this.lastHeard = now;
    this.linkHeard[link] = now;
    const prev = this.peerView;
    this.peerView = message.view;
    // membership first, events after: a listener must see the peer alive
    const wasAlive = this.alive;
    const wasWarned = this.warned;
    this.alive = true;
    this.everSeen = true;
    this.warned = false;
    if (restarted) {
      this.opts.log.info({ generation: message.gen }, 'peer restarted (new generation)');
      this.emit('peer-restarted', message.gen);
    }
    if (!wasAlive) {
      this.opts.log.info({ peer: this.peerId, generation: message.gen, state: message.view.state }, 'peer is alive');
      this.emit('peer-alive');
    } else if (wasWarned) {
      this.opts.log.info({ peer: this.peerId }, 'peer heard again after warntime');
    }
    if (!prev || JSON.stringify(prev) !== JSON.stringify(this.peerView)) this.emit('peer-view', this.peerView);
  }

  private drop(reason: string, rinfo: dgram.RemoteInfo): void {
    this.dropped.inc({ reason });
    // Duplicates are normal with redundant links; everything else is worth a (debug) line.
    if (reason !== 'duplicate') this.opts.log.debug({ reason, from: `${rinfo.address}:${rinfo.port}`, bytes: rinfo.size }, 'heartbeat datagram dropped');
  }

  private check(): void {
    if (!this.alive || this.lastHeard === null) return;
    const silent = Date.now() - this.lastHeard;
    const missed = Math.floor(silent / this.opts.keepaliveMs) - 1;
    if (missed > this.lastMissCount) {
      this.misses.inc(missed - this.lastMissCount);
      this.lastMissCount = missed;
    } else if (missed <= 0) {
      this.lastMissCount = 0;
    }
    if (silent > this.opts.deadtimeMs) {
      this.alive = false;
      this.lastMissCount = 0;
      this.opts.log.warn({ peer: this.peerId, silentMs: silent, deadtimeMs: this.opts.deadtimeMs }, 'peer declared dead');
      this.emit('peer-dead');
      return;
    }
    if (silent > this.opts.warntimeMs && !this.warned) {
      this.warned = true;
      this.warnings.inc();
      this.opts.log.warn({ peer: this.peerId, silentMs: silent, warntimeMs: this.opts.warntimeMs }, 'peer late: no heartbeat past warntime');
    }
  }

  status(): PeerStatus {
    const now = Date.now();
    const paired = this.opts.peers.length === this.opts.listen.length;
    return {
      alive: this.alive,
      everSeen: this.everSeen,
      view: this.peerView,
      lastHeardAt: this.lastHeard,
      generation: this.guard.generation >= 0 ? this.guard.generation : null,
      links: this.opts.listen.map((listen, i) => ({
        listen,
        peer: paired ? this.opts.peers[i]! : this.opts.peers.join(','),
        up: now - (this.linkHeard[i] ?? 0) <= this.opts.deadtimeMs,
      })),
    };
  }

  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    await Promise.all(this.sockets.map((s) => new Promise<void>((r) => s.close(() => r()))));
    this.sockets = [];
  }
}
