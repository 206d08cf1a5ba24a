/**
 * One node of a pair: heartbeat, membership and the node state machine, fencing, the resources
 * (floating IP, store, command resources, health endpoint) and the health reporter.
 *
 * Every change goes through `evaluate()`: build the facts, ask the pure state machine, commit
 * the proposal (checked against the transition table, logged, counted), then run its side
 * effect (fence, start or stop resources). After every await the state is checked again, so a
 * result that arrives late (a fence that finished after the peer came back, a start that ended
 * after maintenance was switched on) is never acted on.
 */
import { existsSync, readFileSync, unlinkSync, writeFileSync } from 'node:fs';
import type { HealthAnswer } from '../common/admin-http.ts';
import { startAdminServer, type AdminServer } from '../common/admin-http.ts';
import { PairgateError } from '../common/errors.ts';
import { HEALTH_PUBLISH_INTERVAL_MS, HEALTH_TTL_MS, pairServes, type HealthRecord, type PairState } from '../common/health.ts';
import type { Logger } from '../common/log.ts';
import { counter, gauge, type MetricsRegistry } from '../common/metrics.ts';
import { RedisBus, keys } from '../common/redis-bus.ts';
import type { Resource } from './resource.ts';
import { checkPairAgentConfig, pairAgentConfigSchema, type PairAgentConfig } from './config.ts';
import { createFenceDevice, Fencer } from './fencing/index.ts';
import { processState } from './fencing/process.ts';
import { Heartbeat, splitHostPort, type PeerStatus } from './ha/heartbeat.ts';
import type { HeartbeatRequest, NodeView } from './ha/heartbeat-codec.ts';
import { checkTransition, decide, diskUsable, NODE_STATES, other, roleOf, STANDBY_HAND_OVER, type Decision, type Facts, type NodeId, type NodeState, type OperatorRequest } from './ha/state-machine.ts';
import { CommandResource } from './resources/command.ts';
import { FloatingIpResource } from './resources/floating-ip.ts';
import { HealthEndpointResource } from './resources/health-endpoint.ts';
import { ResourceManager } from './resources/manager.ts';
import { PingMonitor } from './resources/ping.ts';
import { loadOptionalResources, type OptionalResources } from './resources/optional.ts';

export { pairAgentConfigSchema, type PairAgentConfig };

export interface PairAgentDeps {
  log: Logger;
  registry: MetricsRegistry;
}

export interface PairAgentStatus {
  pair: string;
  node: NodeId;
  state: NodeState;
  holds: boolean;
  request: OperatorRequest;
  maintenance: boolean;
  ping: boolean;
  fencing: string;
  fencingDetail: string | null;
  peer: PeerStatus & { state: string | null };
  resources: string[];
  /** A resource did not stop on this node: it may still run here, and the peer fences this node before taking over. */
  unclean: boolean;
  lastTransition: { at: number; from: NodeState; to: NodeState; reason: string } | null;
  health: HealthRecord;
}

export interface PairAgent {
  readonly adminUrl: string;
  state(): NodeState;
  status(): PairAgentStatus;
  health(): HealthRecord;
  standby(): Promise<PairAgentStatus>;
  takeover(): Promise<PairAgentStatus>;
  maintenance(on: boolean): Promise<PairAgentStatus>;
  /** SIGHUP: applies preferred, autoFailback and logLevel from a re-read config; other changes need a restart (logged). */
  reload(config: PairAgentConfig): Promise<void>;
  stop(): Promise<void>;
}

class Agent implements PairAgent {
  private current: NodeState = 'starting';
  private holds = false;
  private request: OperatorRequest = 'none';
  private maintenanceOn = false;
  private resourcesFailed = false;
  private startFailures = 0;
  private peerHeldOnce = false;
  /** Times this node took the resources back under an operator standby because its peer's start had failed. */
  private standbyRetakes = 0;
  /** This node released the resources on its operator standby, and the peer has not served them yet. */
  private standbyHandOverPending = false;
  /** The peer's operator request as last heard (to see it change). */
  private peerRequest: OperatorRequest = 'none';
  private peerFenced = false;
  private readonly startedAt = Date.now();
  private evaluating = false;
  private again = false;
  private epoch = 0;
  private publishTimer: NodeJS.Timeout | null = null;
  private markTimer: NodeJS.Timeout | null = null;
  /** The peer marked this node's replica older in Redis (keys.pairOutdated): as Outdated until the volumes meet. */
  private outdatedByPeer = false;
  /** A mark naming the peer may be in Redis (written here, or before this start): deleted once the peer is in sync. */
  private markWritten = true;
  /** The mark has been read (or Redis stayed unreachable through initdead, or there is none to read). */
  private markKnown = false;
  /** A read of the mark is on its way (a slow Redis must not pile reads up). */
  private markReading = false;
  private tickTimer: NodeJS.Timeout | null = null;
  private lastPublished = '';
  private lastTransition: { at: number; from: NodeState; to: NodeState; reason: string } | null = null;
  private admin: AdminServer | null = null;
  private bus: RedisBus | null = null;
  private backgroundFence = false;
  /** Why this node last refused the peer's outdate request (logged once per reason). */
  private lastOutdateRefusal = '';
  private readonly heartbeat: Heartbeat;
  private readonly fencer: Fencer;
  private readonly manager: ResourceManager;
  private readonly ping: PingMonitor | null;
  private readonly m;

  constructor(
    private config: PairAgentConfig,
    private readonly log: Logger,
    private readonly registry: MetricsRegistry,
    private readonly optional: OptionalResources,
    private readonly floating: FloatingIpResource,
  ) {
    const c = config;
    this.heartbeat = new Heartbeat({
      pair: c.pair,
      node: c.node,
      key: Buffer.from(c.heartbeat.key, 'utf8'),
      listen: c.heartbeat.listen,
      peers: c.heartbeat.peers,
      keepaliveMs: c.heartbeat.keepaliveMs,
      warntimeMs: c.heartbeat.warntimeMs,
      deadtimeMs: c.heartbeat.deadtimeMs,
      initdeadMs: c.heartbeat.initdeadMs,
      view: () => this.selfView(),
      requests: () => (this.optional.volumeAlone?.() ? ['outdate'] : []),
      log,
      registry,
    });
    this.fencer = new Fencer(c.fencing, createFenceDevice(c.fencing, log), log, registry);
    const serviceAddress = c.serviceAddress ?? c.floatingIp.address;
    const resources: Resource[] = [];
    if (optional.volume) resources.push(optional.volume);
    resources.push(floating);
    if (optional.store) resources.push(optional.store);
    for (const r of c.resources) resources.push(new CommandResource(r, log));
    resources.push(new HealthEndpointResource(serviceAddress, c.healthPort, () => this.healthAnswer(), registry, log));
    this.manager = new ResourceManager(resources, {
      monitorIntervalMs: c.monitor.intervalMs,
      maxRestarts: c.monitor.maxRestarts,
      failureWindowMs: c.monitor.failureWindowMs,
      startTimeoutMs: c.monitor.startTimeoutMs,
      stopTimeoutMs: c.monitor.stopTimeoutMs,
      monitorTimeoutMs: c.monitor.timeoutMs,
      log,
      registry,
    });
    this.manager.on('failed', () => {
      this.markFailed();
      this.changed('resources failed');
    });
    this.manager.on('unclean', () => {
      this.m.unclean.set(1);
      this.changed('a resource did not stop');
    });
    this.manager.on('clean', () => {
      this.m.unclean.set(0);
      this.changed('every resource stopped');
    });
    this.ping = c.ping ? new PingMonitor(c.ping, log) : null;
    this.ping?.on('change', () => this.changed('ping'));
    this.m = {
      failovers: counter(registry, 'failovers_total', 'Takeovers of the pair resources by this node', ['kind']),
      transitions: counter(registry, 'pair_state_transitions_total', 'Node state transitions', ['from', 'to']),
      nodeState: gauge(registry, 'pair_node_state', 'Current node state (1 for the current one)', ['state']),
      peerAlive: gauge(registry, 'pair_peer_alive', '1 while the peer is alive on the heartbeat'),
      fencingFailed: gauge(registry, 'pair_fencing_failed', '1 while the last fencing attempt failed'),
      unclean: gauge(registry, 'pair_node_unclean', '1 while a resource did not stop on this node (the peer fences it before taking over)'),
    };
    this.m.unclean.set(0);
    this.setStateGauge();
  }

  async start(): Promise<void> {
    const c = this.config;
    if (c.pidFile) {
      const other = readPid(c.pidFile);
      if (other !== null && other !== process.pid && processState(other) === 'running') {
        throw new PairgateError('CONFLICT', `another pair-agent runs with pid ${other} (${c.pidFile})`, false);
      }
    }
    const { host, port } = splitHostPort(c.admin.listen);
    this.admin = await startAdminServer({
      host,
      port,
      registry: this.registry,
      token: c.admin.token,
      log: this.log,
      health: () => this.healthAnswer(),
      routes: {
        'GET /status': () => this.status(),
        'POST /standby': () => this.standby(),
        'POST /takeover': () => this.takeover(),
        'POST /maintenance': ({ body }) => {
          const on = (body as { on?: unknown }).on;
          if (typeof on !== 'boolean') throw new PairgateError('BAD_INPUT', 'body must be {"on": true|false}', false);
          return this.maintenance(on);
        },
      },
    });
    if (c.redis) this.bus = new RedisBus({ url: c.redis.url, connectTimeoutMs: c.redis.connectTimeoutMs, commandTimeoutMs: c.redis.commandTimeoutMs, log: this.log });
    this.heartbeat.on('peer-alive', () => {
      this.peerFenced = false;
      this.fencer.reset();
      this.changed('peer alive');
    });
    this.heartbeat.on('peer-restarted', () => {
      this.peerFenced = false;
      this.changed('peer restarted');
    });
    this.heartbeat.on('peer-dead', () => this.changed('peer dead'));
    this.heartbeat.on('peer-request', (request: HeartbeatRequest) => {
      if (request === 'outdate') this.outdateForPeer();
    });
    this.heartbeat.on('peer-view', (view: NodeView) => {
      if (view.holds) this.peerHeldOnce = true;
      if (view.state === 'primary') this.standbyHandOverPending = false;
      // An operator request on the peer given after the same one on this node supersedes it (a
      // standby there: the operator now wants the resources here; a takeover there: there). Kept,
      // the two equal requests cancel out in the election, the preferred node (or a) wins it, and
      // this node's old request then moves the resources once more.
      if (view.request !== 'none' && view.request !== this.peerRequest && this.request === view.request) {
        this.log.info({ request: this.request }, 'the same operator request on the peer, given later: this node\'s is dropped');
        this.request = 'none';
      }
      this.peerRequest = view.request;
      // A peer that said (signed, fresh) it stopped after releasing everything needs no fence.
      if (view.state === 'stopped' && !view.holds && !this.peerFenced) {
        this.peerFenced = true;
        this.log.info('peer stopped cleanly and released its resources: no fence needed');
      }
      this.changed('peer view');
    });
    await this.heartbeat.start();
    if (c.pidFile) writeFileSync(c.pidFile, `${process.pid}\n`);
    this.ping?.start();
    // initdead and other timers: re-evaluate every keepalive
    this.tickTimer = setInterval(() => this.evaluate(), this.config.heartbeat.keepaliveMs);
    this.publishTimer = setInterval(() => void this.publish(false), HEALTH_PUBLISH_INTERVAL_MS);
    // Read before the node may take over alone (diskState() until then); Redis may still be connecting.
    void this.followOutdatedMark();
    this.markTimer = setInterval(() => void this.followOutdatedMark(), OUTDATED_MARK_INTERVAL_MS);
    this.log.info({ admin: this.admin.url, generation: this.heartbeat.generation, initdeadMs: c.heartbeat.initdeadMs }, 'pair-agent started');
    this.evaluate();
  }

  get adminUrl(): string {
    return this.admin?.url ?? '';
  }

  state(): NodeState {
    return this.current;
  }

  private selfView(): NodeView {
    return {
      state: this.current,
      holds: this.holds,
      disk: this.diskState(),
      ping: this.ping ? this.ping.reachable : true,
      request: this.request,
      failed: this.resourcesFailed,
      ...(this.manager.unclean ? { unclean: true as const } : {}),
    };
  }

  private diskState(): string {
    const disk = this.optional.volumeDisk?.() ?? 'none';
    if (disk !== 'UpToDate') return disk;
    // Its own metadata cannot know (fenced by a reboot, it never heard it was outdated). Until the
    // mark has been read, a node alone does not take over on its metadata either.
    if (this.outdatedByPeer || (!this.markKnown && !this.peerFacts().alive)) return 'Outdated';
    return disk;
  }

  /**
   * The outdated mark in Redis (keys.pairOutdated), for the case the volume's own Outdated state
   * cannot cover: this node fenced (rebooted) while its peer wrote alone, the peer then lost, and
   * this node starting alone with metadata that says UpToDate. Read until known, then while the
   * peer is away. It applies while it names this node and its data generation is not among this
   * node's (after a resync from the holder it is): the replica is then Outdated, in its metadata
   * too. Dropped here once the volumes meet or the operator promotes this volume by hand.
   */
  private async followOutdatedMark(): Promise<void> {
    if (this.current === 'stopped') return;
    if (!this.bus || !this.optional.volumeDisk) {
      this.markKnown = true;
      return;
    }
    const key = keys.pairOutdated(this.config.pair);
    const linked = this.peerFacts().linked !== false;
    if (this.outdatedByPeer && (linked || this.optional.volumeRole?.() === 'primary')) {
      this.outdatedByPeer = false;
      this.log.info({ why: linked ? 'the volumes met' : 'the volume was promoted by hand' }, "the peer's mark on this replica no longer applies");
      this.changed('outdated mark dropped');
      return;
    }
    if (this.holds) {
      // The peer in sync again: the mark is spent (one left behind is harmless: a node that has
      // its generation ignores it, see `applies` below).
      if (this.markWritten && this.optional.volumePeerDisk?.() === 'UpToDate') {
        this.markWritten = false;
        await this.bus.del(key).catch(() => undefined);
      }
      return;
    }
    if ((this.markKnown && this.peerFacts().alive) || this.markReading) return;
    this.markReading = true;
    try {
      const raw = await this.bus.get(key);
      const mark = raw ? (JSON.parse(raw) as { node?: unknown; by?: unknown; at?: unknown; uuid?: unknown }) : null;
      const generations = this.optional.volumeUuids?.() ?? [];
      const applies = mark?.node === this.config.node && typeof mark.uuid === 'string' && !generations.includes(mark.uuid);
      if (!this.markKnown) {
        this.markKnown = true;
        this.changed('outdated mark read');
      }
      if (applies === this.outdatedByPeer) return;
      this.outdatedByPeer = applies;
      if (applies) {
        this.log.warn({ by: mark?.by, at: mark?.at }, "the peer marked this node's replica older (it wrote without it): Outdated, no takeover alone; `pairgate volume primary --force` only if the peer's data is lost");
        try {
          this.optional.volumeOutdate?.(); // durable: a Redis outage later must not undo it
        } catch (err) {
          this.log.info({ err: (err as Error).message }, 'the replica could not be marked Outdated in its metadata');
        }
      }
      this.changed('outdated mark');
    } catch (err) {
      if (!this.markKnown && Date.now() - this.startedAt >= this.config.heartbeat.initdeadMs) {
        this.markKnown = true;
        this.log.warn({ err: (err as Error).message }, 'the outdated mark could not be read from Redis within initdead: going by the local metadata');
        this.changed('outdated mark unknown');
      }
    } finally {
      this.markReading = false;
    }
  }

  /** Marks the peer's replica older in Redis, for a peer that restarts alone before the two volumes meet. */
  private async writeOutdatedMark(how: 'outdated' | 'fenced'): Promise<void> {
    if (!this.bus) return;
    const peer = other(this.config.node);
    // The generation this node writes now: a peer that has it (resynced since) is not older.
    const uuid = this.optional.volumeUuids?.()[0];
    this.markWritten = true;
    try {
      await this.bus.set(keys.pairOutdated(this.config.pair), JSON.stringify({ node: peer, by: this.config.node, how, uuid, at: Date.now() }));
      this.log.info({ peer, how }, "the peer's replica is marked older in Redis (this node writes without it)");
    } catch (err) {
      this.log.warn({ err: (err as Error).message }, "the peer's replica could not be marked older in Redis: should it restart alone, it goes by its own metadata");
    }
  }

  /** The peer as the state machine sees it: a peer that said it stopped is treated as gone. */
  private peerFacts(): Facts['peer'] {
    const s = this.heartbeat.status();
    const stopped = s.view?.state === 'stopped';
    // While the replication link is up, the volume knows the peer's disk state before the peer's
    // next heartbeat does (two fresh volumes turn UpToDate together): the election uses that, so
    // both nodes compare the same disks and exactly one takes over.
    const linkDisk = this.optional.volumePeerDisk?.();
    const view = s.view && linkDisk ? { ...s.view, disk: linkDisk } : s.view;
    // Without the link, the peer's disk is its own word (see handOverReason): no hand-over to it.
    const linked = this.optional.volumePeerDisk ? linkDisk !== null && linkDisk !== undefined : true;
    // A peer whose resource did not stop may still run it: it counts as dead (it is fenced, then
    // the resources are taken over), though it still sends heartbeats.
    // Not while it is in maintenance: its resources are the operator's then.
    const unclean = s.alive && s.view?.unclean === true && s.view.state !== 'maintenance';
    return { alive: s.alive && !stopped && !unclean, everSeen: s.everSeen, view, linked, ...(unclean ? { unclean } : {}) };
  }

  private facts(): Facts {
    const v = this.selfView();
    return {
      node: this.config.node,
      preferred: this.config.preferred,
      autoFailback: this.config.autoFailback,
      initdeadOver: Date.now() - this.startedAt >= this.config.heartbeat.initdeadMs,
      self: { holds: v.holds, disk: v.disk, ping: v.ping, request: v.request, failed: v.failed, maintenance: this.maintenanceOn },
      peer: this.peerFacts(),
      peerFenced: this.peerFenced,
    };
  }

  /** Something outside the agent changed (a volume event): re-evaluate and tell the peer. */
  notify(why: string): void {
    if (this.current !== 'stopped') this.changed(why);
  }

  private changed(why: string): void {
    this.log.debug({ why }, 're-evaluating');
    this.evaluate();
    this.heartbeat.sendNow();
  }

  /** Asks the state machine and commits its proposal; serialised, re-run when something changed meanwhile. */
  evaluate(): void {
    if (this.current === 'stopped') return;
    if (this.evaluating) {
      this.again = true;
      return;
    }
    this.evaluating = true;
    try {
      for (let i = 0; i < 10; i++) {
        this.again = false;
        this.settlePeerFence();
        const f = this.facts();
        this.maybeBackgroundFence(f);
        const d = decide(this.current, f);
        if (d) this.commit(d);
        if (!d && !this.again) break;
      }
    } finally {
      this.evaluating = false;
    }
  }

  /**
   * Writes held by this primary's volume (it lost its link, or was promoted without its peer) go
   * on once the peer cannot be promoted with the old data: fenced, or alive with a disk that is
   * not UpToDate (it outdated itself at this node's request, or is mid-resync).
   */
  private settlePeerFence(): void {
    const since = this.optional.volumeFenceSince?.() ?? null;
    if (since === null) return;
    if (this.peerFenced) {
      void this.writeOutdatedMark('fenced');
      this.optional.volumeSettlePeer!('fenced');
      return;
    }
    // The peer's own word on its heartbeat (its metadata), heard after the writes were held: not
    // the replication link's view of its disk (a sync source marks the target Inconsistent before
    // the target has stored it), nor an older datagram (Inconsistent from a resync since finished).
    const hb = this.heartbeat.status();
    const alive = this.peerFacts().alive;
    if (alive && hb.view && (hb.lastHeardAt ?? 0) > since && !diskUsable(hb.view.disk)) {
      void this.writeOutdatedMark('outdated');
      this.optional.volumeSettlePeer!('outdated');
    }
  }

  /** The primary lost its link to this node's volume and writes alone: this node's data is outdated. */
  private outdateForPeer(): void {
    // The volume's own word, not diskState(): a replica the peer's Redis mark already treats as
    // Outdated must still be outdated in its metadata, which outlives a Redis outage.
    if (!this.optional.volumeOutdate || this.holds || this.optional.volumeDisk?.() !== 'UpToDate') return;
    try {
      this.optional.volumeOutdate();
      this.log.warn('the primary writes without this node (replication link lost): local disk marked Outdated');
    } catch (err) {
      // The request repeats every keepalive while the primary is alone: say why once, not each time.
      const why = (err as Error).message;
      if (why !== this.lastOutdateRefusal) this.log.info({ err: why }, 'outdate request from the primary not applied');
      this.lastOutdateRefusal = why;
    }
  }

  private commit(d: Decision): void {
    const from = this.current;
    const ok = checkTransition(from, d.to);
    if (!ok.ok) {
      this.log.error({ from, to: d.to, reason: d.reason, refused: ok.reason }, 'state transition refused');
      return;
    }
    this.current = d.to;
    this.epoch += 1;
    if (d.to === 'releasing') this.standbyHandOverPending = d.reason === STANDBY_HAND_OVER;
    this.lastTransition = { at: Date.now(), from, to: d.to, reason: d.reason };
    this.m.transitions.inc({ from, to: d.to });
    this.setStateGauge();
    this.log.info({ from, to: d.to, reason: d.reason, kind: d.kind }, 'state change');
    this.bus?.publishQuietly({ type: 'state', pair: this.config.pair, node: this.config.node, from, to: d.to, reason: d.reason });
    this.heartbeat.sendNow();
    void this.publish(true);
    this.enter(d.to, from);
  }

  private setStateGauge(): void {
    for (const s of NODE_STATES) this.m.nodeState.set({ state: s }, s === this.current ? 1 : 0);
  }

  /** Side effects of entering a state; each checks the epoch after its awaits. */
  private enter(state: NodeState, from: NodeState): void {
    const epoch = this.epoch;
    const still = () => this.epoch === epoch;
    switch (state) {
      case 'fencing':
        void this.fencer
          .fencePeer(() => still() && !this.peerFacts().alive)
          .then((ok) => {
            this.m.fencingFailed.set(this.fencer.status === 'failed' ? 1 : 0);
            if (ok && still()) {
              this.peerFenced = true;
              this.evaluate();
            }
          });
        // a failed attempt changes health (fencing: failed) while the loop retries
        this.watchFencing(still);
        return;
      case 'taking-over':
        this.holds = true;
        // the first placement at cluster start is not a failover
        if (from === 'fencing' || this.peerHeldOnce) this.m.failovers.inc({ kind: this.peerFacts().alive ? 'handover' : 'peer-down' });
        // Elected back under an operator standby because the peer's start failed (it released a
        // moment ago and the hand-over went wrong, maybe for a passing cause): the standby stands,
        // and the hand-over is tried again once the peer's backoff is over (a few times at most).
        const peerNow = this.peerFacts();
        // Only while that hand-over is pending: a peer that served and failed later (its monitor)
        // is failed over from as always, the standby then dropped, not handed the resources back.
        const peerFailedHandover = this.standbyHandOverPending && this.request === 'standby' && peerNow.alive && !!peerNow.view?.failed;
        void this.manager.startAll().then(
          () => {
            if (!still()) return;
            if (peerFailedHandover && this.request === 'standby' && this.standbyRetakes < MAX_STANDBY_RETAKES) {
              this.standbyRetakes += 1;
              this.log.warn({ attempt: this.standbyRetakes }, 'took the resources back: the peer failed to start them; the operator standby stands, the hand-over is tried again after the peer\'s backoff');
            } else if (this.request !== 'none') {
              if (peerFailedHandover) this.log.warn({ attempts: this.standbyRetakes + 1 }, 'the peer failed to take the resources over again: the operator standby is dropped');
              this.request = 'none';
              this.standbyRetakes = 0;
            }
            this.startFailures = 0;
            this.commit({ to: 'primary', reason: 'resources started', kind: 'soft' });
          },
          (err) => {
            this.log.error({ err: (err as Error).message }, 'takeover failed: releasing');
            this.markFailed();
            if (still()) this.commit({ to: 'releasing', reason: 'resources failed to start', kind: 'hard' });
          },
        );
        return;
      case 'releasing':
        this.fencer.cancel();
        // Writes held for the peer would keep the store from stopping: they fail (never acknowledged).
        this.optional.volumeFailHeld?.('the node releases its resources');
        void this.release(still);
        return;
      case 'maintenance':
        this.manager.stopMonitor();
        return;
      case 'primary':
        if (from === 'maintenance') void this.manager.recheckUnclean(true).then(() => this.manager.monitorOnce());
        return;
      case 'standby':
        if (from === 'maintenance') void this.manager.recheckUnclean(false);
        return;
      default:
        return;
    }
  }

  private watchFencing(still: () => boolean): void {
    let last = this.fencer.status;
    const t = setInterval(() => {
      if (!still() || this.current === 'stopped') {
        clearInterval(t);
        return;
      }
      if (this.fencer.status !== last) {
        last = this.fencer.status;
        this.m.fencingFailed.set(last === 'failed' ? 1 : 0);
        void this.publish(true);
        this.heartbeat.sendNow();
      }
    }, 50);
  }

  /** A failed start: hold off (so a live peer is preferred, and a lone node retries with a growing backoff). */
  private markFailed(): void {
    this.resourcesFailed = true;
    this.startFailures += 1;
    const backoff = Math.min(1000 * 2 ** (this.startFailures - 1), 30_000, this.config.monitor.failureWindowMs);
    this.log.warn({ retryInMs: backoff, failures: this.startFailures }, 'resources failed to start here');
    setTimeout(() => {
      if (this.current === 'stopped') return;
      this.resourcesFailed = false;
      // Still holding the resources the monitor gave up on: nobody took them (a lone primary, or a
      // peer that cannot), so try them here again rather than serve with them down and say ok.
      if (this.current === 'primary' && this.manager.failed) {
        this.log.warn({ failures: this.startFailures }, 'resources failed here and nobody took them over: restarting them here');
        void this.manager.retry();
      }
      this.changed('start backoff over');
    }, backoff).unref();
  }

  private async release(still: () => boolean): Promise<void> {
    for (let attempt = 1; ; attempt++) {
      try {
        await this.manager.stopAll();
        this.holds = false;
        if (still()) this.commit({ to: 'standby', reason: 'resources stopped', kind: 'soft' });
        return;
      } catch (err) {
        this.log.error({ err: (err as Error).message, attempt }, 'releasing: a resource did not stop; retrying (unclean: the peer fences this node before it takes over)');
        await new Promise((r) => setTimeout(r, Math.min(1000 * attempt, 5000)));
        if (!still()) return;
      }
    }
  }

  /** A primary also fences a dead peer (so that in a partition exactly one node survives, thanks to the delay). */
  private maybeBackgroundFence(f: Facts): void {
    if (this.backgroundFence || f.peer.alive || !f.peer.everSeen || this.peerFenced) return;
    if (this.current !== 'primary') return;
    this.backgroundFence = true;
    const epoch = this.epoch;
    void this.fencer
      .fencePeer(() => this.current === 'primary' && this.epoch === epoch && !this.peerFacts().alive)
      .then((ok) => {
        this.backgroundFence = false;
        this.m.fencingFailed.set(this.fencer.status === 'failed' ? 1 : 0);
        if (ok) {
          this.peerFenced = true;
          this.evaluate();
        }
        void this.publish(true);
      });
  }

  // ---- health ----

  health(): HealthRecord {
    const peerId = other(this.config.node);
    const hb = this.heartbeat.status();
    const pf = this.peerFacts();
    const peerView = hb.view;
    const selfRole = roleOf(this.current, this.holds);
    const peerRole = pf.alive && peerView ? roleOf(peerView.state, peerView.holds) : 'unknown';
    const iAmPrimary = this.current === 'primary';
    const peerPrimary = pf.alive && peerView?.state === 'primary';
    const transitional = (s: string | undefined) => s === 'taking-over' || s === 'fencing' || s === 'releasing';
    const fencingFailed = this.fencer.status === 'failed';
    const extra = this.optional.healthExtras?.() ?? {};
    // Serving without a connected, in-sync peer disk is not redundant: losing this node now
    // would lose mail the peer never got, so the pair is degraded until replication is back.
    const replication = extra.replication;
    const notRedundant = replication !== undefined && replication.connection !== 'none' && replication.connection !== 'Connected';
    let state: PairState;
    if (this.current === 'maintenance' || (pf.alive && peerView?.state === 'maintenance')) state = 'maintenance';
    else if (fencingFailed && !iAmPrimary && !peerPrimary) state = 'down';
    else if (transitional(this.current) || (pf.alive && transitional(peerView?.state))) state = 'failing-over';
    else if (iAmPrimary || peerPrimary) state = pf.alive && !fencingFailed && !this.resourcesFailed && !(iAmPrimary && this.manager.failed) && !notRedundant ? 'ok' : 'degraded';
    else state = 'down';
    const heartbeatWord = pf.alive ? 'up' : hb.everSeen ? 'down' : 'unknown';
    const nodes = {
      [this.config.node]: { heartbeat: 'self', role: selfRole, disk: this.diskState(), state: this.current },
      [peerId]: { heartbeat: heartbeatWord, role: peerRole, disk: pf.alive && peerView ? peerView.disk : 'unknown', state: pf.alive && peerView ? peerView.state : 'unknown' },
    };
    return {
      pair: this.config.pair,
      at: Date.now(),
      state,
      primary: iAmPrimary ? this.config.node : peerPrimary ? peerId : null,
      nodes,
      replication: extra.replication ?? { connection: 'none', protocol: 'none', outOfSyncBytes: 0 },
      store: extra.store ?? { mailboxes: 0, messages: 0, bytesUsed: 0, bytesTotal: 0 },
      sessions: extra.sessions ?? { imap: 0, pop3: 0, lmtp: 0 },
      fencing: this.fencer.status,
      address: this.config.serviceAddress ?? this.config.floatingIp.address,
    };
  }

  private healthAnswer(): HealthAnswer {
    const h = this.health();
    return { healthy: pairServes(h.state), body: h };
  }

  /** The node that holds or is getting the resources (or that sees nobody doing so) writes the pair's record. */
  private shouldPublish(): boolean {
    if (this.current === 'stopped' || this.current === 'starting') return false;
    if (this.holds || this.current === 'fencing' || this.current === 'taking-over' || this.current === 'releasing') return true;
    if (this.current === 'maintenance') return true;
    return !this.peerFacts().alive;
  }

  private async publish(onChange: boolean): Promise<void> {
    if (!this.bus || !this.shouldPublish()) return;
    const h = this.health();
    const sig = `${h.state}|${h.primary}|${h.fencing}|${h.nodes.a?.heartbeat}|${h.nodes.b?.heartbeat}`;
    if (onChange && sig === this.lastPublished) return;
    const changed = sig !== this.lastPublished;
    this.lastPublished = sig;
    try {
      await this.bus.set(keys.pairHealth(this.config.pair), JSON.stringify(h), HEALTH_TTL_MS);
      if (changed) await this.bus.publish({ type: 'health', pair: this.config.pair, state: h.state, at: h.at });
    } catch (err) {
      this.log.debug({ err: (err as Error).message }, 'health not published (redis unavailable)');
    }
  }

  // ---- operator ----

  status(): PairAgentStatus {
    const hb = this.heartbeat.status();
    return {
      pair: this.config.pair,
      node: this.config.node,
      state: this.current,
      holds: this.holds,
      request: this.request,
      maintenance: this.maintenanceOn,
      ping: this.ping ? this.ping.reachable : true,
      fencing: this.fencer.status,
      fencingDetail: this.fencer.last?.detail ?? null,
      peer: { ...hb, state: hb.view?.state ?? null },
      resources: this.manager.resources.map((r) => r.name),
      unclean: this.manager.unclean,
      lastTransition: this.lastTransition,
      health: this.health(),
    };
  }

  async standby(): Promise<PairAgentStatus> {
    if (this.maintenanceOn) throw new PairgateError('CONFLICT', 'the node is in maintenance: switch maintenance off first', false);
    if (this.holds && !this.peerFacts().alive) throw new PairgateError('CONFLICT', 'the peer is not up: nobody to hand the resources to', false);
    // No hand-over goes to a peer whose volume has not met this one's (handOverReason): say so
    // now, rather than accept a request that would wait unseen.
    if (this.holds && this.peerFacts().linked === false) {
      throw new PairgateError('CONFLICT', "the peer's replicated volume is not connected to this node's, so it may lack the latest writes: no hand-over until replication is Connected (pairgate pair status)", false);
    }
    this.request = 'standby';
    this.standbyRetakes = 0;
    this.log.info('operator: standby');
    this.changed('operator standby');
    return this.status();
  }

  async takeover(): Promise<PairAgentStatus> {
    if (this.maintenanceOn) throw new PairgateError('CONFLICT', 'the node is in maintenance: switch maintenance off first', false);
    if (this.outdatedByPeer) throw new PairgateError('CONFLICT', "the peer marked this replica older in Redis (it wrote without it): refusing to take over; `pairgate volume primary --force` only if the peer's data is lost", false);
    if (this.diskState() !== 'UpToDate' && this.diskState() !== 'none') throw new PairgateError('CONFLICT', `local disk is ${this.diskState()}: refusing to take over`, false);
    // The peer hands over to no node whose volume has not met its own (handOverReason), as for
    // standby: say so now, rather than keep a request that would move the resources whenever the
    // link comes back.
    const peer = this.peerFacts();
    if (!this.holds && peer.alive && peer.view?.holds && peer.linked === false) {
      throw new PairgateError('CONFLICT', "this node's replicated volume is not connected to the peer's, so it may lack the latest writes: no takeover until replication is Connected (pairgate pair status)", false);
    }
    this.request = this.current === 'primary' ? 'none' : 'takeover';
    this.resourcesFailed = false;
    this.log.info('operator: takeover');
    this.changed('operator takeover');
    return this.status();
  }

  async maintenance(on: boolean): Promise<PairAgentStatus> {
    if (on === this.maintenanceOn) return this.status();
    this.maintenanceOn = on;
    this.log.info({ on }, 'operator: maintenance');
    this.changed(`operator maintenance ${on ? 'on' : 'off'}`);
    return this.status();
  }

  async reload(next: PairAgentConfig): Promise<void> {
    checkPairAgentConfig(next);
    const live = ['preferred', 'autoFailback', 'logLevel'] as const;
    const restartKeys = (Object.keys(next) as Array<keyof PairAgentConfig>).filter(
      (k) => !(live as readonly string[]).includes(k) && JSON.stringify(next[k]) !== JSON.stringify(this.config[k]),
    );
    if (next.pair !== this.config.pair || next.node !== this.config.node) throw new PairgateError('BAD_INPUT', 'pair and node cannot change on reload', false);
    if (restartKeys.length) this.log.warn({ keys: restartKeys }, 'reload: these keys need a restart of the agent; kept the running values');
    this.config = { ...this.config, preferred: next.preferred, autoFailback: next.autoFailback, logLevel: next.logLevel };
    this.log.level = next.logLevel;
    this.log.info({ preferred: next.preferred, autoFailback: next.autoFailback, logLevel: next.logLevel }, 'reload applied');
    this.changed('config reloaded');
  }

  async stop(): Promise<void> {
    if (this.current === 'stopped') return;
    const from = this.current;
    this.epoch += 1;
    this.fencer.cancel();
    if (this.tickTimer) clearInterval(this.tickTimer);
    if (this.publishTimer) clearInterval(this.publishTimer);
    if (this.markTimer) clearInterval(this.markTimer);
    if (from !== 'maintenance' && this.holds) {
      this.optional.volumeFailHeld?.('the agent stops');
      try {
        await this.manager.stopAll();
        this.holds = false;
      } catch (err) {
        this.log.error({ err: (err as Error).message }, 'a resource did not stop cleanly');
      }
    }
    this.manager.stopMonitor();
    const c = this.config;
    if (c.pidFile && existsSync(c.pidFile)) {
      try {
        if (readFileSync(c.pidFile, 'utf8').trim() === String(process.pid)) unlinkSync(c.pidFile);
      } catch {
        // best effort
      }
    }
    this.current = 'stopped';
    this.setStateGauge();
    this.log.info({ from, to: 'stopped' }, 'state change');
    // tell the peer at once (twice, against a lost datagram), so it takes over without waiting for deadtime
    await this.heartbeat.send();
    await new Promise((r) => setTimeout(r, 20));
    await this.heartbeat.send();
    await this.publish(true);
    await this.heartbeat.close();
    this.ping?.stop();
    await this.optional.close?.();
    await this.admin?.close();
    await this.bus?.close();
  }
}

/** How often the outdated mark in Redis is followed (read while the peer is away, cleared once it is in sync). */
const OUTDATED_MARK_INTERVAL_MS = 250;

/** Hand-overs tried again under one operator standby after the peer failed to start the resources. */
const MAX_STANDBY_RETAKES = 3;

function readPid(file: string): number | null {
  try {
    const n = Number.parseInt(readFileSync(file, 'utf8').trim(), 10);
    return Number.isInteger(n) && n > 1 ? n : null;
  } catch {
    return null;
  }
}

/** Starts the agent; rejects (ConfigError, exit 2) on a bad config, or when a socket cannot be bound. */
export async function startPairAgent(config: PairAgentConfig, deps: PairAgentDeps): Promise<PairAgent> {
  checkPairAgentConfig(config);
  const log = deps.log.child({ pair: config.pair, node: config.node });
  const floating = new FloatingIpResource(config.floatingIp, log);
  let agent: Agent | null = null;
  const optional = await loadOptionalResources(config, {
    log,
    registry: deps.registry,
    listenHost: config.serviceAddress ?? config.floatingIp.address,
    onChange: (why) => agent?.notify(why),
  });
  agent = new Agent(config, log, deps.registry, optional, floating);
  try {
    await agent.start();
  } catch (err) {
    await agent.stop().catch(() => undefined);
    throw err;
  }
  return agent;
}
