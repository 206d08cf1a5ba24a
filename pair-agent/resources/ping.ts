/**
 * Ping targets, like Heartbeat's ipfail: the node probes its targets every interval and counts
 * as reachable while at least one answers. After `failures` rounds in a row with none, it is
 * unreachable; one answering target makes it reachable again. Changes are emitted as 'change'.
 */
import { EventEmitter } from 'node:events';
import type { Logger } from '../../common/log.ts';
import { probeTarget } from './probe.ts';

export interface PingOptions {
  targets: string[];
  intervalMs: number;
  timeoutMs: number;
  failures: number;
}

export class PingMonitor extends EventEmitter {
  reachable = true;
  private misses = 0;
  private timer: NodeJS.Timeout | null = null;
  private running = false;

  constructor(private readonly opts: PingOptions, private readonly log: Logger) {
    super();
  }

  start(): void {
    this.timer = setInterval(() => void this.round(), this.opts.intervalMs);
    void this.round();
  }

  async round(): Promise<void> {
    if (this.running) return;
    this.running = true;
    try {
      const results = await Promise.all(this.opts.targets.map((t) => probeTarget(t, this.opts.timeoutMs)));
      if (!this.timer) return;
      const any = results.some(Boolean);
      if (any) {
        this.misses = 0;
        if (!this.reachable) {
          this.reachable = true;
          this.log.info({ targets: this.opts.targets }, 'ping targets reachable again');
          this.emit('change', true);
        }
      } else {
        this.misses += 1;
        if (this.reachable && this.misses >= this.opts.failures) {
          this.reachable = false;
          this.log.warn({ targets: this.opts.targets, rounds: this.misses }, 'no ping target reachable');
          this.emit('change', false);
        }
      }
    } finally {
      this.running = false;
    }
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }
}
