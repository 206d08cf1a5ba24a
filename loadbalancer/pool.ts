/**
 * A pool: its backends, the balancing algorithm over them, and the queue of clients waiting
 * for a free slot (backend or listener maxconn), each bounded in time (`queueTimeoutMs`) and in
 * number (`maxQueue`).
 */
import type { Logger } from '../common/log.ts';
import { Backend } from './backend.ts';
import { Balancer } from './balance.ts';
import type { PoolConfig } from './config.ts';
import type { LbMetrics } from './metrics.ts';

export interface SlotHolder {
  /** Whether the listener this client came in on has a free slot. */
  hasSlot(): boolean;
}

interface Waiter {
  slot: SlotHolder;
  clientAddress: string;
  since: number;
  timer: NodeJS.Timeout;
  /** Called with a backend (slot reserved by the caller) or null (timeout / pool gone). */
  resume(b: Backend | null, reason?: string): void;
}

export class Pool {
  backends: Backend[] = [];
  balancer: Balancer<Backend>;
  private queue: Waiter[] = [];
  private draining = false;
  /** Called when a backend of this pool goes up or down (set before checks start). */
  onHealthChange: (b: Backend, up: boolean, reason: string) => void = () => {};

  constructor(
    readonly name: string,
    public config: PoolConfig,
    private readonly metrics: LbMetrics,
    private readonly log: Logger,
  ) {
    this.balancer = new Balancer(config.balance, []);
    this.apply(config);
  }

  /** Reconciles the backends with a (new) config: kept ones keep state and connections. */
  apply(config: PoolConfig): void {
    const old = this.backends;
    const next: Backend[] = [];
    for (const cfg of config.backends) {
      const kept = old.find((b) => b.sameAs(cfg));
      if (kept) {
        kept.update(cfg, config);
        next.push(kept);
      } else {
        const b = new Backend(this.name, cfg, config, this.metrics, this.log);
        b.onCapacity = () => this.dispatch();
        b.onHealth = (up, reason) => this.onHealthChange(b, up, reason);
        next.push(b);
      }
    }
    for (const b of old) if (!next.includes(b)) b.retire();
    if (config.balance !== this.config.balance) this.balancer = new Balancer(config.balance, next);
    else this.balancer.setBackends(next);
    this.config = config;
    this.backends = next;
    this.dispatch();
  }

  startChecks(): void {
    for (const b of this.backends) b.startChecks();
  }

  stopChecks(): void {
    for (const b of this.backends) b.stopChecks();
  }

  /** Whether any backend could take clients at all (up and ready), full or not. */
  serviceable(): boolean {
    return this.backends.some((b) => b.serviceable());
  }

  pick(clientAddress: string, exclude?: ReadonlySet<Backend>): Backend | null {
    return this.balancer.pick(clientAddress, exclude);
  }

  queued(): number {
    return this.queue.length;
  }

  /** Queues a client; false when the queue is full (caller refuses the client). */
  enqueue(slot: SlotHolder, clientAddress: string, resume: Waiter['resume']): { cancel(): void } | null {
    if (this.queue.length >= this.config.maxQueue || this.config.queueTimeoutMs === 0) return null;
    const w: Waiter = {
      slot,
      clientAddress,
      since: Date.now(),
      resume,
      timer: setTimeout(() => {
        const i = this.queue.indexOf(w);
        if (i >= 0) this.queue.splice(i, 1);
        w.resume(null, 'queue-timeout');
      }, this.config.queueTimeoutMs),
    };
    this.queue.push(w);
    return {
      cancel: () => {
        const i = this.queue.indexOf(w);
        if (i >= 0) {
          this.queue.splice(i, 1);
          clearTimeout(w.timer);
        }
      },
    };
  }

  /** Hands free slots to waiting clients, oldest first. */
  dispatch(): void {
    if (this.draining || this.queue.length === 0) return;
    this.draining = true;
    try {
      for (let i = 0; i < this.queue.length; ) {
        const w = this.queue[i]!;
        if (!w.slot.hasSlot()) {
          i++;
          continue;
        }
        const b = this.pick(w.clientAddress);
        if (!b) break; // no backend has a slot: nobody behind can go either
        this.queue.splice(i, 1);
        clearTimeout(w.timer);
        this.metrics.queueSeconds.observe((Date.now() - w.since) / 1000);
        w.resume(b);
      }
    } finally {
      this.draining = false;
    }
  }

  /** Pool removed or balancer stopping: every waiting client is refused. */
  close(): void {
    this.stopChecks();
    for (const b of this.backends) b.retire();
    const q = this.queue;
    this.queue = [];
    for (const w of q) {
      clearTimeout(w.timer);
      w.resume(null, 'pool-closed');
    }
  }
}
