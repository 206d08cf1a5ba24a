/**
 * Fencing: the device plugins behind one schema, and the Fencer that runs a fence with the
 * node's delay (so that in a heartbeat partition exactly one node fences the other), retries a
 * failed fence with a capped exponential backoff for as long as the agent still wants it, and
 * reports the outcome in health (`fencing: failed`) and in pairgate_fencing_actions_total{outcome}.
 */
import { z } from 'zod';
import { durationMs } from '../../common/config.ts';
import type { Logger } from '../../common/log.ts';
import { counter, type MetricsRegistry } from '../../common/metrics.ts';
import { CommandFenceDevice } from './command.ts';
import { HttpFenceDevice } from './http.ts';
import { ProcessFenceDevice } from './process.ts';
import type { FenceDevice, FenceOutcome } from './types.ts';

export type { FenceDevice, FenceOutcome } from './types.ts';

const common = {
  /** Wait this long before the first attempt: set on ONE node of the pair (the one that should lose a fence race). */
  delayMs: durationMs.default(0),
  timeoutMs: durationMs.default(5000),
  action: z.enum(['off', 'reboot']).default('off'),
  retryInitialMs: durationMs.default(200),
  retryMaxMs: durationMs.default(5000),
};

export const fencingConfigSchema = z.discriminatedUnion('device', [
  z
    .object({
      device: z.literal('command'),
      /** A fence agent (e.g. /usr/sbin/fence_ipmilan); options are written to its stdin as key=value lines. */
      command: z.string().min(1),
      args: z.array(z.string()).default([]),
      options: z.record(z.string(), z.union([z.string(), z.number(), z.boolean()])).default({}),
      /** After `off`, run `action=status` and require exit 2 (off). */
      confirm: z.boolean().default(false),
      ...common,
    })
    .strict(),
  z
    .object({
      device: z.literal('http'),
      /** The peer's outlet on the power switch. */
      url: z.string().url(),
      token: z.string().optional(),
      confirm: z.boolean().default(true),
      ...common,
    })
    .strict(),
  z
    .object({
      device: z.literal('process'),
      pidFile: z.string().optional(),
      pid: z.number().int().positive().optional(),
      /** The target's command line must contain this (a recycled pid is never killed); '' turns the check off. */
      match: z.string().default('pair-agent'),
      /** An empty or missing pid file means the peer process is off (it died and nobody restarted it). */
      missingIsOff: z.boolean().default(true),
      ...common,
      timeoutMs: durationMs.default(2000),
    })
    .strict(),
]).refine((c) => c.device !== 'process' || c.pidFile !== undefined || c.pid !== undefined, { message: 'process fencing needs pidFile or pid' });

export type FencingConfig = z.output<typeof fencingConfigSchema>;

export function createFenceDevice(config: FencingConfig, log: Logger): FenceDevice {
  switch (config.device) {
    case 'command':
      return new CommandFenceDevice({ command: config.command, args: config.args, options: config.options, timeoutMs: config.timeoutMs, confirm: config.confirm, log });
    case 'http':
      return new HttpFenceDevice({ url: config.url, token: config.token, timeoutMs: config.timeoutMs, confirm: config.confirm });
    case 'process':
      return new ProcessFenceDevice({ pidFile: config.pidFile, pid: config.pid, match: config.match || undefined, timeoutMs: config.timeoutMs, missingIsOff: config.missingIsOff });
  }
}

export type FencingStatus = 'none' | 'pending' | 'ok' | 'failed';

export class Fencer {
  status: FencingStatus = 'none';
  last: FenceOutcome | null = null;
  attempts = 0;
  private readonly actions;
  private abort: AbortController | null = null;

  constructor(
    private readonly config: FencingConfig,
    private readonly device: FenceDevice,
    private readonly log: Logger,
    registry: MetricsRegistry,
  ) {
    this.actions = counter(registry, 'fencing_actions_total', 'Fencing attempts by outcome', ['outcome', 'device']);
    for (const o of ['ok', 'failed', 'timeout', 'error']) this.actions.inc({ outcome: o, device: device.kind }, 0);
  }

  /**
   * Fences the peer: the configured delay, then attempts until one is confirmed (true), or until
   * `wanted()` turns false (false). Never throws.
   */
  async fencePeer(wanted: () => boolean): Promise<boolean> {
    this.abort?.abort();
    const ac = new AbortController();
    this.abort = ac;
    this.status = 'pending';
    this.attempts = 0;
    const sleep = (ms: number) => new Promise<void>((r) => {
      const t = setTimeout(r, ms);
      ac.signal.addEventListener('abort', () => { clearTimeout(t); r(); }, { once: true });
    });
    if (this.config.delayMs > 0 && !this.device.isCertainlyOff?.()) {
      this.log.info({ delayMs: this.config.delayMs }, 'fence delay before fencing the peer');
      await sleep(this.config.delayMs);
    }
    let backoff = this.config.retryInitialMs;
    while (!ac.signal.aborted && wanted()) {
      this.attempts += 1;
      const started = Date.now();
      let outcome: FenceOutcome;
      try {
        outcome = await this.device.fence(this.config.action, ac.signal);
      } catch (err) {
        outcome = { outcome: 'error', detail: (err as Error).message };
      }
      this.last = outcome;
      this.actions.inc({ outcome: outcome.outcome, device: this.device.kind });
      if (outcome.outcome === 'ok') {
        this.status = 'ok';
        this.log.warn({ device: this.device.kind, action: this.config.action, ms: Date.now() - started, detail: outcome.detail }, 'peer fenced');
        return true;
      }
      this.status = 'failed';
      this.log.error({ device: this.device.kind, outcome: outcome.outcome, detail: outcome.detail, attempt: this.attempts, retryInMs: backoff }, 'fencing failed: no takeover');
      await sleep(backoff);
      backoff = Math.min(backoff * 2, this.config.retryMaxMs);
    }
    if (this.status === 'pending') this.status = 'none';
    return false;
  }

  /** Stops a running fence loop (the peer came back, the agent stops). */
  cancel(): void {
    this.abort?.abort();
    this.abort = null;
  }

  /** A new peer episode (the peer is alive again): forget the last outcome. */
  reset(): void {
    this.cancel();
    this.status = 'none';
  }
}
