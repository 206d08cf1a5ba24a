/** `pairgate pair-agent` refuses bad configs with exit 2 and the key named; `pairgate pair` without a target is a usage error. */
import { execFile } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { stringify } from 'yaml';
import { tempDir } from '../helpers/proc.ts';
import { REPO } from './pair-agent-harness.ts';

const work = tempDir('pairgate-pa-cli-');
afterAll(() => work.cleanup());

function run(args: string[]): Promise<{ code: number; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [join(REPO, 'bin', 'pairgate.mjs'), ...args], { cwd: REPO, timeout: 30_000 }, (err, _out, stderr) => {
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stderr });
    });
  });
}

const base = {
  pair: 'p',
  node: 'a',
  heartbeat: { key: 'k'.repeat(20), listen: '127.0.0.1:1', peers: ['127.0.0.1:2'] },
  fencing: { device: 'process', pidFile: '/nonexistent/peer.pid' },
  floatingIp: { mode: 'loopback', address: '127.0.5.1' },
};

describe('pair-agent CLI bad input', () => {
  it.each([
    ['both nodes preferred', { ...base, preferred: ['a', 'b'] }, /preferred: only one node can be preferred/],
    ['floating IP outside loopback', { ...base, floatingIp: { mode: 'loopback', address: '10.1.2.3' } }, /floatingIp.address: 10.1.2.3 is not in 127.0.0.0\/8/],
    ['unset heartbeat key variable', { ...base, heartbeat: { ...base.heartbeat, key: '${PAIRGATE_TEST_UNSET_KEY}' } }, /heartbeat.key: environment variable PAIRGATE_TEST_UNSET_KEY is not set/],
  ])('%s: exit 2 with the key named', async (_name, config, message) => {
    const file = join(work.path, `${Math.random().toString(36).slice(2)}.yaml`);
    writeFileSync(file, stringify(config));
    const r = await run(['pair-agent', '--config', file]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(message);
  });
  it('pair status without --config or --admin is a usage error', async () => {
    const r = await run(['pair', 'status']);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('--config FILE');
  });
});
