/** Resource manager order and monitor policy, OCF command exit codes, floating IP and config checks. */
import { EventEmitter } from 'node:events';
import { writeFileSync } from 'node:fs';
import { z } from 'zod';
import { volumeResource } from '../../pair-agent/resources/volume.ts';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { validateConfig } from '../../common/config.ts';
import { ConfigError } from '../../common/errors.ts';
import { silentLogger } from '../../common/log.ts';
import { createRegistry } from '../../common/metrics.ts';
import type { MonitorResult, Resource } from '../../pair-agent/resource.ts';
import { ResourceManager } from '../../pair-agent/resources/manager.ts';
import { CommandResource, commandResourceSchema } from '../../pair-agent/resources/command.ts';
import { FloatingIpResource } from '../../pair-agent/resources/floating-ip.ts';
import { checkPairAgentConfig, pairAgentConfigSchema } from '../../pair-agent/config.ts';
import { tempDir } from '../helpers/proc.ts';

const work = tempDir('pairgate-res-unit-');
afterAll(() => work.cleanup());

class Fake implements Resource {
  state: MonitorResult = 'stopped';
  failStart = false;
  constructor(readonly name: string, private readonly journal: string[]) {}
  async start() {
    this.journal.push(`start ${this.name}`);
    if (this.failStart) throw new Error(`${this.name} broken`);
    this.state = 'running';
  }
  async stop() {
    this.journal.push(`stop ${this.name}`);
    this.state = 'stopped';
  }
  async monitor() {
    return this.state;
  }
}

const mgr = (rs: Resource[], maxRestarts = 2, bounds: { startTimeoutMs?: number; stopTimeoutMs?: number; monitorTimeoutMs?: number } = {}) =>
  new ResourceManager(rs, { monitorIntervalMs: 60_000, maxRestarts, failureWindowMs: 60_000, ...bounds, log: silentLogger, registry: createRegistry({}, false) });

/** A resource whose actions wait until the test lets them return (a hung disk, a stuck service). */
class Stuck implements Resource {
  readonly calls: string[] = [];
  private readonly gates = new Map<string, () => void>();
  hang = new Set<string>();
  fail = new Set<string>();
  constructor(readonly name: string) {}
  private async act(action: string): Promise<void> {
    this.calls.push(action);
    if (this.hang.has(action)) await new Promise<void>((r) => this.gates.set(action, r));
    if (this.fail.has(action)) throw new Error(`${this.name} ${action} broken`);
  }
  release(action: string): void {
    this.hang.delete(action);
    this.gates.get(action)?.();
  }
  start = () => this.act('start');
  stop = () => this.act('stop');
  async monitor(): Promise<MonitorResult> {
    await this.act('monitor');
    return 'running';
  }
}

describe('resource manager', () => {
  it('starts in order and stops in reverse', async () => {
    const j: string[] = [];
    const m = mgr([new Fake('volume', j), new Fake('ip', j), new Fake('store', j)]);
    await m.startAll();
    await m.stopAll();
    expect(j).toEqual(['start volume', 'start ip', 'start store', 'stop store', 'stop ip', 'stop volume']);
  });
  it('a failed start stops what was started, in reverse, and throws', async () => {
    const j: string[] = [];
    const bad = new Fake('store', j);
    bad.failStart = true;
    const m = mgr([new Fake('volume', j), new Fake('ip', j), bad]);
    await expect(m.startAll()).rejects.toThrow('store broken');
    expect(j).toEqual(['start volume', 'start ip', 'start store', 'stop store', 'stop ip', 'stop volume']);
  });
  it('monitor failure restarts locally, then gives up past the threshold', async () => {
    const j: string[] = [];
    const r = new Fake('svc', j);
    const m = mgr([r], 2);
    let failed = '';
    m.on('failed', (n: string) => (failed = n));
    await m.startAll();
    for (let i = 0; i < 3; i++) {
      r.state = 'failed';
      await m.monitorOnce();
    }
    expect(j.filter((x) => x === 'start svc').length).toBe(3); // first start + 2 restarts
    expect(failed).toBe('svc');
    expect(m.failed).toBe(true);
    await m.stopAll();
  });
});

describe('resource manager: action time bounds and unclean stops', () => {
  const tick = () => new Promise((r) => setTimeout(r, 10));

  it('a start past its bound fails the start and what started is stopped; the resource\'s stop waits for the overrun start, and is given up with it', async () => {
    const j: string[] = [];
    const stuck = new Stuck('store');
    stuck.hang.add('start');
    const m = mgr([new Fake('volume', j), stuck], 2, { startTimeoutMs: 100, stopTimeoutMs: 100 });
    let unclean = '';
    m.on('unclean', (n: string) => (unclean = n));
    await expect(m.startAll()).rejects.toMatchObject({ code: 'TIMEOUT', message: 'store start did not return within 100 ms' });
    // The clean-up stop of the store waited its bound for the start, which still runs: a stop that
    // did not happen (the store may come up yet), so the node is unclean. The volume stopped.
    expect(stuck.calls).toEqual(['start']);
    expect(j).toEqual(['start volume', 'stop volume']);
    expect(unclean).toBe('store');
    expect(m.unclean).toBe(true);
    // The start returns: the stop given up meanwhile is not begun late; the next one runs, and a
    // good stop makes the node clean again.
    stuck.release('start');
    await tick();
    expect(stuck.calls).toEqual(['start']);
    let clean = false;
    m.on('clean', () => (clean = true));
    await m.stopAll();
    expect(stuck.calls).toEqual(['start', 'stop']);
    expect(m.unclean).toBe(false);
    expect(clean).toBe(true);
  });

  it('a stop that fails or overruns leaves the node unclean until that resource stops', async () => {
    const failing = new Stuck('svc');
    const hanging = new Stuck('ip');
    const m = mgr([hanging, failing], 2, { stopTimeoutMs: 100 });
    await m.startAll();
    failing.fail.add('stop');
    hanging.hang.add('stop');
    const events: string[] = [];
    m.on('unclean', (n: string) => events.push(`unclean ${n}`));
    m.on('clean', () => events.push('clean'));
    // Every resource is tried; the first failure is thrown.
    await expect(m.stopAll()).rejects.toThrow('svc stop broken');
    expect(hanging.calls).toEqual(['start', 'stop']);
    expect(events).toEqual(['unclean svc']);
    expect(m.unclean).toBe(true);
    // svc now stops; ip's first stop still hangs and its second waits for it: still unclean.
    failing.fail.delete('stop');
    await expect(m.stopAll()).rejects.toMatchObject({ code: 'TIMEOUT', message: expect.stringMatching(/^ip stop not begun within 100 ms: an earlier stop of it, asked for \d+ ms ago, has not returned$/) });
    expect(hanging.calls).toEqual(['start', 'stop']);
    expect(m.unclean).toBe(true);
    hanging.release('stop');
    await tick();
    await m.stopAll();
    expect(hanging.calls).toEqual(['start', 'stop', 'stop']);
    expect(m.unclean).toBe(false);
    expect(events).toEqual(['unclean svc', 'clean']);
  });

  /** A started resource whose monitor hangs past its 100 ms bound: the pass is waiting in the restart's stop. */
  const overrunMonitor = async () => {
    const r = new Stuck('svc');
    const m = mgr([r], 2, { monitorTimeoutMs: 100, stopTimeoutMs: 5000 });
    await m.startAll();
    r.hang.add('monitor');
    const pass = m.monitorOnce();
    await new Promise((res) => setTimeout(res, 250));
    expect(r.calls).toEqual(['start', 'monitor']);
    return { r, m, pass };
  };

  it('a monitor past its bound is a failed monitor: the restart\'s stop waits for it, then the resource restarts', async () => {
    const { r, m, pass } = await overrunMonitor();
    r.release('monitor');
    await pass;
    expect(r.calls).toEqual(['start', 'monitor', 'stop', 'start']);
    expect(m.unclean).toBe(false);
    expect(m.failed).toBe(false);
    await m.stopAll();
  });

  it('a release during a monitor\'s restart: the restart does not start the resource again after the release stopped it', async () => {
    const { r, m, pass } = await overrunMonitor();
    // The monitor overran; its restart's stop waits for it. Now the node releases.
    const release = m.stopAll();
    r.release('monitor');
    await Promise.all([pass, release]);
    expect(r.calls).toEqual(['start', 'monitor', 'stop', 'stop']);
    expect(m.unclean).toBe(false);
  });
});

describe('OCF command resource', () => {
  it('maps exit codes: 0 running, 7 stopped, others failed; start/stop errors throw', async () => {
    const s = join(work.path, 'ocf.sh');
    writeFileSync(s, '#!/bin/sh\ncase "$1" in start) exit "$OCF_RESKEY_start";; stop) exit 7;; monitor) exit "$OCF_RESKEY_mon";; esac\nexit 3\n', { mode: 0o755 });
    const mk = (start: number, mon: number) => new CommandResource(commandResourceSchema.parse({ type: 'command', name: 'x', command: s, params: { start, mon } }), silentLogger);
    await expect(mk(0, 0).start()).resolves.toBeUndefined();
    await expect(mk(1, 0).start()).rejects.toThrow(/exited 1/);
    await expect(mk(0, 0).stop()).resolves.toBeUndefined(); // 7 = already stopped is fine for stop
    expect(await mk(0, 0).monitor()).toBe('running');
    expect(await mk(0, 7).monitor()).toBe('stopped');
    expect(await mk(0, 5).monitor()).toBe('failed');
    const hang = new CommandResource(commandResourceSchema.parse({ type: 'command', name: 'h', command: 'sh', args: ['-c', 'sleep 30', 'ocf'], timeoutMs: 200 }), silentLogger);
    const t0 = Date.now();
    await expect(hang.start()).rejects.toThrow(/timed out/);
    expect(Date.now() - t0).toBeLessThan(5000);
  });
});

describe('floating IP and config checks', () => {
  it('loopback mode binds the address; an address outside 127/8 is refused', async () => {
    const ip = new FloatingIpResource({ mode: 'loopback', address: '127.0.99.1' }, silentLogger);
    expect(await ip.monitor()).toBe('stopped');
    await ip.start();
    expect(await ip.monitor()).toBe('running');
    await ip.stop();
    expect(() => new FloatingIpResource({ mode: 'loopback', address: '10.0.0.1' }, silentLogger)).toThrow(ConfigError);
    expect(() => new FloatingIpResource({ mode: 'iproute', address: '127.0.0.5', prefix: 24, interface: 'eth0', arping: true, arpCount: 1 }, silentLogger)).toThrow(/iproute/);
  });
  const base = {
    pair: 'p',
    node: 'a',
    heartbeat: { key: 'x'.repeat(20), listen: '127.0.0.1:1', peers: ['127.0.0.1:2'] },
    fencing: { device: 'process', pidFile: '/tmp/x.pid' },
    floatingIp: { mode: 'loopback', address: '127.0.5.1' },
  };
  it('names the key: both nodes preferred, bad timings, short key, process fencing without pid', () => {
    expect(() => validateConfig(pairAgentConfigSchema, { ...base, preferred: ['a', 'b'] })).toThrow(/preferred: only one node can be preferred/);
    expect(() => validateConfig(pairAgentConfigSchema, { ...base, heartbeat: { ...base.heartbeat, deadtimeMs: 100 } })).toThrow(/heartbeat.deadtimeMs/);
    expect(() => validateConfig(pairAgentConfigSchema, { ...base, heartbeat: { ...base.heartbeat, key: 'short' } })).toThrow(/heartbeat.key/);
    expect(() => validateConfig(pairAgentConfigSchema, { ...base, fencing: { device: 'process' } })).toThrow(/pidFile or pid/);
    expect(() => validateConfig(pairAgentConfigSchema, { ...base, bogus: 1 })).toThrow(/bogus: unknown key/);
    const c = validateConfig(pairAgentConfigSchema, { ...base, preferred: 'b' });
    expect(c.preferred).toBe('b');
    expect(c.heartbeat).toMatchObject({ keepaliveMs: 100, warntimeMs: 300, deadtimeMs: 600, initdeadMs: 2000, listen: ['127.0.0.1:1'] });
    expect(() => checkPairAgentConfig(validateConfig(pairAgentConfigSchema, { ...base, floatingIp: { mode: 'loopback', address: '192.168.1.5' } }))).toThrow(/floatingIp.address/);
    // admin as `listen` or as host/port like the other roles
    expect(validateConfig(pairAgentConfigSchema, { ...base, admin: { host: '127.0.0.1', port: 9026, token: 't' } }).admin).toEqual({ listen: '127.0.0.1:9026', token: 't' });
    expect(validateConfig(pairAgentConfigSchema, { ...base, admin: { listen: '127.0.0.1:9027' } }).admin.listen).toBe('127.0.0.1:9027');
    expect(() => checkPairAgentConfig(validateConfig(pairAgentConfigSchema, { ...base, store: { masterUser: 'm', masterSecret: 'secret-123' } }))).toThrow(/store: the store needs a disk/);
  });
});

describe('replicated volume resource (adapter over pair-agent/volume exports)', () => {
  class FakeVolume extends EventEmitter {
    role = 'secondary';
    disk = 'UpToDate';
    calls: string[] = [];
    async promote() {
      this.calls.push('promote');
      this.role = 'primary';
      this.emit('role', 'primary');
    }
    async demote() {
      this.calls.push('demote');
      this.role = 'secondary';
      this.emit('role', 'secondary');
    }
    status() {
      return { role: this.role, disk: this.disk, connection: 'Connected', protocol: 'C', outOfSyncBytes: 8192 };
    }
    async close() {}
  }
  it('promotes on start, demotes on stop, reports disk and replication, and forwards volume events', async () => {
    const vol = new FakeVolume();
    let seen: Record<string, unknown> | null = null;
    const changes: string[] = [];
    const mod = {
      volumeConfigSchema: z.object({ name: z.string(), fencing: z.string() }).strict(),
      openReplicatedVolume: async (c: Record<string, unknown>) => {
        seen = c;
        return vol;
      },
    };
    const opt = await volumeResource(mod, { name: 'v' }, { log: silentLogger, registry: createRegistry({}, false), onChange: (w) => changes.push(w) });
    // Under the agent, a volume holds writes for its peer by default (fencing resource-and-stonith).
    expect(seen).toEqual({ name: 'v', fencing: 'resource-and-stonith' });
    const r = opt.volume!;
    expect(await r.monitor()).toBe('stopped');
    await r.start();
    await r.start(); // idempotent
    expect(await r.monitor()).toBe('running');
    vol.disk = 'Inconsistent';
    expect(await r.monitor()).toBe('failed');
    expect(opt.volumeDisk!()).toBe('Inconsistent');
    expect(opt.healthExtras!().replication).toEqual({ connection: 'Connected', protocol: 'C', outOfSyncBytes: 8192 });
    await r.stop();
    expect(vol.calls).toEqual(['promote', 'demote']);
    expect(changes).toEqual(['volume role', 'volume role']);
    await expect(volumeResource(mod, { name: 'v', bogus: 1 }, { log: silentLogger, registry: createRegistry({}, false) })).rejects.toThrow(/volume.bogus/);
  });
});
