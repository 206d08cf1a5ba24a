/**
 * Crash consistency: a child process delivers continuously and is SIGKILLed at a random
 * moment; the store is reopened and every acknowledged delivery must be there, intact, with
 * the full scan clean. Repeated with seeds printed for reproduction (STORE_CRASH_SEED=...).
 */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/log.ts';
import { FileBlockDevice } from '../../pair-agent/volume/block-device.ts';
import { openMailStore } from '../../pair-agent/store/index.ts';
import { tempDir } from '../helpers/proc.ts';
import { crashBody, crashUsers } from './store-crash-child.ts';

const child = join(fileURLToPath(new URL('.', import.meta.url)), 'store-crash-child.ts');

function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 0x100000000;
  };
}

async function runUntilKilled(path: string, start: number, killAfterAcks: number, extraMs: number): Promise<{ acked: number[]; expunged: Array<[string, number]> }> {
  const p = spawn(process.execPath, ['--import', 'tsx', child, path, String(start)], { stdio: ['ignore', 'pipe', 'pipe'] });
  const acked: number[] = [];
  const expunged: Array<[string, number]> = [];
  let err = '';
  let buf = '';
  p.stderr.on('data', (d: Buffer) => (err += d.toString()));
  await new Promise<void>((resolve, reject) => {
    const t = setTimeout(() => {
      p.kill('SIGKILL');
      reject(new Error(`child made no progress in 30 s (acked ${acked.length}); stderr: ${err.slice(-2000)}`));
    }, 30_000);
    let killing = false;
    p.stdout.on('data', (d: Buffer) => {
      buf += d.toString();
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        const m = /^ACK (\d+)$/.exec(line);
        if (m) acked.push(Number(m[1]));
        const e = /^EXP (u\d+) (\d+)$/.exec(line);
        if (e) expunged.push([e[1]!, Number(e[2])]);
      }
      if (!killing && acked.length >= killAfterAcks) {
        killing = true;
        setTimeout(() => p.kill('SIGKILL'), extraMs);
      }
    });
    p.on('exit', () => {
      clearTimeout(t);
      if (!killing) reject(new Error(`child exited early: ${err.slice(-2000)}`));
      else resolve();
    });
  });
  return { acked, expunged };
}

describe('store crash consistency', () => {
  it('every acknowledged delivery survives SIGKILL at random points', async () => {
    const seed = Number(process.env.STORE_CRASH_SEED ?? Date.now() % 1_000_000);
    console.log(`store crash test seed: ${seed} (rerun with STORE_CRASH_SEED=${seed})`);
    const rand = rng(seed);
    const dir = tempDir('pairgate-store-crash-');
    const path = join(dir.path, 'vol.img');
    const dev0 = await FileBlockDevice.open(path, { size: 48 * 1024 * 1024, create: true });
    await (await openMailStore(dev0, { log: silentLogger })).close();
    await dev0.close();
    const allAcked = new Set<number>();
    const expunged = new Set<string>();
    let next = 0;
    const rounds = 8;
    try {
      for (let round = 0; round < rounds; round++) {
        const killAfter = 20 + Math.floor(rand() * 60);
        const extra = Math.floor(rand() * 40);
        const { acked, expunged: ex } = await runUntilKilled(path, next, killAfter, extra);
        for (const a of acked) allAcked.add(a);
        for (const [u, n] of ex) expunged.add(`${u}:${n}`);
        next = Math.max(next, ...acked) + 1000;
        const dev = await FileBlockDevice.open(path);
        const store = await openMailStore(dev, { log: silentLogger, compactBytesPerSec: 0 });
        try {
          // Every acknowledged delivery is there for both recipients (unless expunged on purpose), byte for byte.
          const byUser = new Map<string, Map<string, Buffer>>();
          for (let u = 0; u < 7; u++) {
            const m = new Map<string, Buffer>();
            for (const meta of await store.listMessages(`u${u}`, 'INBOX').catch(() => [])) m.set(String(meta.uid), await store.readMessage(meta.bodyId));
            byUser.set(`u${u}`, m);
          }
          const present = new Map<string, Set<number>>();
          for (const [u, msgs] of byUser) {
            const s = new Set<number>();
            for (const body of msgs.values()) {
              const n = Number(/X-N: (\d+)/.exec(body.toString('latin1'))![1]);
              expect(body.equals(crashBody(n)), `message ${n} of ${u} is intact`).toBe(true);
              s.add(n);
            }
            present.set(u, s);
          }
          const missing: string[] = [];
          for (const n of allAcked) {
            for (const u of crashUsers(n)) {
              if (!present.get(u)!.has(n)) missing.push(`${u}:${n}`);
            }
          }
          // Messages removed by the child's own expunges are allowed to be missing.
          const explained = missing.filter((k) => expunged.has(k));
          expect(missing.length - explained.length, `missing acknowledged deliveries: ${missing.slice(0, 10).join(', ')}`).toBe(0);
          const rep = await store.check();
          expect(rep.problems, rep.problems.join('\n')).toEqual([]);
          // Idempotency after the crash: redelivering an acknowledged id stores nothing new.
          const some = [...allAcked][0]!;
          const again = await store.deliver(`crash-${some}`, crashUsers(some), crashBody(some));
          expect(again.every((r) => r.duplicate)).toBe(true);
        } finally {
          await store.close();
          await dev.close();
        }
      }
      expect(allAcked.size).toBeGreaterThan(rounds * 20);
      console.log(`crash test: ${rounds} kills, ${allAcked.size} acknowledged deliveries verified, ${expunged.size} expunges`);
    } finally {
      dir.cleanup();
    }
  }, 120_000);
});
