/** Fencing devices and the Fencer: stdin format, exit codes, timeouts, HTTP switch, process kill, delay and retries. */
import { spawn } from 'node:child_process';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/log.ts';
import { createRegistry } from '../../common/metrics.ts';
import { CommandFenceDevice, fenceAgentInput } from '../../pair-agent/fencing/command.ts';
import { HttpFenceDevice } from '../../pair-agent/fencing/http.ts';
import { ProcessFenceDevice, processState } from '../../pair-agent/fencing/process.ts';
import { Fencer, fencingConfigSchema } from '../../pair-agent/fencing/index.ts';
import type { FenceDevice, FenceOutcome } from '../../pair-agent/fencing/types.ts';
import { tempDir } from '../helpers/proc.ts';

const work = tempDir('pairgate-fence-unit-');
afterAll(() => work.cleanup());
const never = new AbortController().signal;

function script(name: string, body: string): string {
  const f = join(work.path, name);
  writeFileSync(f, `#!/bin/sh\n${body}\n`, { mode: 0o755 });
  return f;
}

describe('fence-agents command', () => {
  it('writes key=value lines on stdin and refuses values that break a line', () => {
    expect(fenceAgentInput('off', { ip: '10.0.0.1', plug: 3, lanplus: true })).toBe('action=off\nip=10.0.0.1\nplug=3\nlanplus=true\n');
    expect(() => fenceAgentInput('off', { ip: 'x\naction=on' })).toThrow(/one line/);
  });
  it('exit 0 = ok; the agent sees action and options on stdin', async () => {
    const out = join(work.path, 'stdin.txt');
    const dev = new CommandFenceDevice({ command: script('ok', `cat > ${out}`), args: [], options: { plug: 'node-b' }, timeoutMs: 3000, confirm: false, log: silentLogger });
    expect(await dev.fence('reboot', never)).toMatchObject({ outcome: 'ok' });
    expect(readFileSync(out, 'utf8')).toBe('action=reboot\nplug=node-b\n');
  });
  it('non-zero exit = failed, with the first stderr line; a hanging agent is killed at its timeout', async () => {
    const bad = new CommandFenceDevice({ command: script('bad', 'echo "no route to BMC" >&2; exit 1'), args: [], options: {}, timeoutMs: 3000, confirm: false, log: silentLogger });
    const r = await bad.fence('off', never);
    expect(r.outcome).toBe('failed');
    expect(r.detail).toContain('no route to BMC');
    const t0 = Date.now();
    const hang = new CommandFenceDevice({ command: script('hang', 'sleep 30; exit 0'), args: [], options: {}, timeoutMs: 300, confirm: false, log: silentLogger });
    expect((await hang.fence('off', never)).outcome).toBe('timeout');
    expect(Date.now() - t0).toBeLessThan(10_000);
    const missing = new CommandFenceDevice({ command: join(work.path, 'nope'), args: [], options: {}, timeoutMs: 300, confirm: false, log: silentLogger });
    expect((await missing.fence('off', never)).outcome).toBe('failed');
  });
  it('confirm: off must be followed by status exit 2', async () => {
    const state = join(work.path, 'power');
    const body = `read -r a; case "$a" in action=off) echo off > ${state}; exit 0;; action=status) [ "$(cat ${state})" = off ] && exit 2 || exit 0;; esac`;
    const dev = new CommandFenceDevice({ command: script('confirm', body), args: [], options: {}, timeoutMs: 3000, confirm: true, log: silentLogger });
    expect((await dev.fence('off', never)).outcome).toBe('ok');
    const liar = new CommandFenceDevice({ command: script('liar', 'read -r a; exit 0'), args: [], options: {}, timeoutMs: 3000, confirm: true, log: silentLogger });
    expect((await liar.fence('off', never)).outcome).toBe('failed');
  });
});

describe('HTTP power switch', () => {
  it('POSTs the action with the token and waits for state off', async () => {
    let state = 'on';
    const seen: string[] = [];
    const server = http.createServer((req, res) => {
      if (req.headers.authorization !== 'Bearer s3cret') {
        res.writeHead(401).end();
        return;
      }
      let body = '';
      req.on('data', (c) => (body += c));
      req.on('end', () => {
        seen.push(`${req.method} ${body}`);
        if (req.method === 'POST') setTimeout(() => (state = 'off'), 150);
        res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ state }));
      });
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/outlet/7`;
    try {
      expect(await new HttpFenceDevice({ url, token: 's3cret', timeoutMs: 3000, confirm: true }).fence('off', never)).toMatchObject({ outcome: 'ok' });
      expect(seen[0]).toBe('POST {"action":"off"}');
      expect(await new HttpFenceDevice({ url, token: 'wrong', timeoutMs: 3000, confirm: true }).fence('off', never)).toMatchObject({ outcome: 'failed' });
    } finally {
      server.close();
    }
    expect((await new HttpFenceDevice({ url, token: 's3cret', timeoutMs: 500, confirm: true }).fence('off', never)).outcome).toMatch(/error|timeout/);
  });
});

describe('local process device', () => {
  it('kills the process named by the pid file and confirms it is gone', async () => {
    const child = spawn('sleep', ['60'], { stdio: 'ignore' });
    const pidFile = join(work.path, 'peer.pid');
    writeFileSync(pidFile, `${child.pid}\n`);
    const dev = new ProcessFenceDevice({ pidFile, timeoutMs: 2000, missingIsOff: true });
    expect(dev.isCertainlyOff()).toBe(false);
    const r = await dev.fence('off', never);
    expect(r).toMatchObject({ outcome: 'ok' });
    expect(processState(child.pid!)).not.toBe('running');
    expect(dev.isCertainlyOff()).toBe(true);
    expect((await dev.fence('off', never)).detail).toContain('already gone');
  });
  it('a pid whose command line does not match is never killed; missing pid file per policy', async () => {
    const child = spawn('sleep', ['60'], { stdio: 'ignore' });
    try {
      const dev = new ProcessFenceDevice({ pid: child.pid!, match: 'pairgate pair-agent', timeoutMs: 500, missingIsOff: true });
      expect((await dev.fence('off', never)).outcome).toBe('failed');
      expect(processState(child.pid!)).toBe('running');
    } finally {
      child.kill('SIGKILL');
    }
    expect((await new ProcessFenceDevice({ pidFile: join(work.path, 'none.pid'), timeoutMs: 500, missingIsOff: false }).fence('off', never)).outcome).toBe('failed');
    expect((await new ProcessFenceDevice({ pidFile: join(work.path, 'none.pid'), timeoutMs: 500, missingIsOff: true }).fence('off', never)).outcome).toBe('ok');
  });
});

describe('Fencer', () => {
  class Scripted implements FenceDevice {
    readonly kind = 'scripted';
    calls: number[] = [];
    constructor(private readonly outcomes: FenceOutcome['outcome'][]) {}
    async fence(): Promise<FenceOutcome> {
      this.calls.push(Date.now());
      return { outcome: this.outcomes.shift() ?? 'ok', detail: 'scripted' };
    }
  }
  const config = (over: Record<string, unknown> = {}) =>
    fencingConfigSchema.parse({ device: 'command', command: '/bin/true', delayMs: 0, retryInitialMs: 20, retryMaxMs: 40, ...over });

  it('retries a failed fence with backoff until it succeeds, counting each outcome', async () => {
    const registry = createRegistry({}, false);
    const dev = new Scripted(['failed', 'timeout', 'error', 'ok']);
    const f = new Fencer(config(), dev, silentLogger, registry);
    expect(await f.fencePeer(() => true)).toBe(true);
    expect(f.status).toBe('ok');
    expect(dev.calls.length).toBe(4);
    const text = await registry.metrics();
    expect(text).toMatch(/pairgate_fencing_actions_total\{outcome="failed",device="scripted"\} 1/);
    expect(text).toMatch(/pairgate_fencing_actions_total\{outcome="ok",device="scripted"\} 1/);
  });
  it('stops retrying when the fence is no longer wanted, and reports failed meanwhile', async () => {
    const dev = new Scripted(['failed', 'failed', 'failed', 'failed', 'failed', 'failed']);
    const f = new Fencer(config(), dev, silentLogger, createRegistry({}, false));
    let wanted = true;
    const p = f.fencePeer(() => wanted);
    await new Promise((r) => setTimeout(r, 60));
    expect(f.status).toBe('failed');
    wanted = false;
    expect(await p).toBe(false);
  });
  it('waits the configured delay before the first attempt', async () => {
    const dev = new Scripted(['ok']);
    const f = new Fencer(config({ delayMs: 200 }), dev, silentLogger, createRegistry({}, false));
    const t0 = Date.now();
    await f.fencePeer(() => true);
    expect(dev.calls[0]! - t0).toBeGreaterThanOrEqual(190);
  });
});
