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
import { startProcess, tempDir } from '../helpers/proc.ts';
import { freePort, waitForPort } from '../helpers/net.ts';
import net from 'node:net';
import { writeFileSync } from 'node:fs';
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
    const dev0 = await FileBlockDevice.open(path, { size: 32 * 1024 * 1024, create: true });
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

  it('an LMTP 250 survives kill -9 of `pairgate store serve`', async () => {
    const seed = Number(process.env.STORE_CRASH_SEED ?? Date.now() % 1_000_000);
    const rand = rng(seed + 1);
    console.log(`LMTP crash test seed: ${seed}`);
    const dir = tempDir('pairgate-store-lmtp-crash-');
    const vol = join(dir.path, 'vol.img');
    const [lmtp, pop3, imap, admin] = [await freePort(), await freePort(), await freePort(), await freePort()];
    const cfg = join(dir.path, 'store.yaml');
    writeFileSync(
      cfg,
      `volume: { path: ${vol}, sizeBytes: 33554432 }\nadmin: { host: 127.0.0.1, port: ${admin} }\nlog: { level: warn }\n` +
        `store:\n  ports: { lmtp: ${lmtp}, pop3: ${pop3}, imap: ${imap} }\n  masterUser: m\n  masterSecret: crash-secret\n  checkpointBytes: 1048576\n`,
    );
    const proc = startProcess('store', process.execPath, [join(process.cwd(), 'bin/pairgate.mjs'), 'store', 'serve', '--config', cfg]);
    const acked = new Map<string, string[]>();
    try {
      await waitForPort('127.0.0.1', admin, 20_000, () => proc.alive());
      // The kill comes from a timer, independent of the clients (which stop when their connections end).
      // Armed at the first acknowledgement (a loaded machine may take a while to get there), with a safety bound.
      const killDelay = 500 + Math.floor(rand() * 1000);
      let killTimer: NodeJS.Timeout | null = null;
      const safety = setTimeout(() => proc.kill('SIGKILL'), 30_000);
      let n = 0;
      const client = async (w: number) => {
        const sock = net.connect({ port: lmtp, host: '127.0.0.1' });
        let buf = '';
        let wake: (() => void) | null = null;
        let closed = false;
        sock.on('data', (d: Buffer) => {
          buf += d.toString();
          wake?.();
        });
        sock.on('close', () => {
          closed = true;
          wake?.();
        });
        sock.on('error', () => undefined);
        const lines = async (k: number): Promise<string[] | null> => {
          const deadline = Date.now() + 10_000;
          for (;;) {
            const parts = buf.split('\r\n');
            const done = parts.slice(0, -1).filter((l) => !/^\d{3}-/.test(l));
            if (done.length >= k) {
              buf = parts.slice(-1)[0]!;
              // keep any extra complete lines
              const extra = parts.slice(0, -1).filter((l) => !/^\d{3}-/.test(l)).slice(k);
              if (extra.length) buf = extra.join('\r\n') + '\r\n' + buf;
              return done.slice(0, k);
            }
            if (closed || Date.now() > deadline) return null;
            await new Promise<void>((r) => {
              const t = setTimeout(r, 200);
              wake = () => {
                clearTimeout(t);
                r();
              };
            });
          }
        };
        if (!(await lines(1))) return;
        sock.write('LHLO crash\r\n');
        if (!(await lines(1))) return;
        while (!closed) {
          const i = n++;
          const to = [`l${i % 5}`, `l${(i + 2) % 5}`];
          const id = `lmtp-crash-${w}-${i}`;
          sock.write(`MAIL FROM:<c@x>\r\n${to.map((u) => `RCPT TO:<${u}@pair>\r\n`).join('')}DATA\r\n`);
          if (!(await lines(4))) return;
          sock.write(`X-Pairgate-Delivery-Id: ${id}\r\nSubject: ${id}\r\n\r\n${'q'.repeat((i * 977) % 30_000)}\r\n.\r\n`);
          const r = await lines(2);
          if (!r) return;
          const ok = to.filter((_, k) => r[k]!.startsWith('250'));
          if (ok.length) acked.set(id, ok);
          if (!killTimer) killTimer = setTimeout(() => proc.kill('SIGKILL'), killDelay);
        }
      };
      await Promise.all([0, 1, 2].map(client));
      if (killTimer) clearTimeout(killTimer);
      clearTimeout(safety);
      if (proc.alive()) proc.kill('SIGKILL');
      await proc.exited;
    } finally {
      if (proc.alive()) proc.kill('SIGKILL');
      await proc.exited;
    }
    expect(acked.size).toBeGreaterThan(0);
    const dev = await FileBlockDevice.open(vol);
    const store = await openMailStore(dev, { log: silentLogger, compactBytesPerSec: 0 });
    try {
      const have = new Set<string>();
      for (let u = 0; u < 5; u++) {
        for (const m of await store.listMessages(`l${u}`, 'INBOX').catch(() => [])) {
          const subject = /Subject: (\S+)/.exec((await store.readMessage(m.bodyId)).toString('latin1'))![1];
          have.add(`l${u}:${subject}`);
        }
      }
      const missing = [...acked].flatMap(([id, users]) => users.map((u) => `${u}:${id}`)).filter((k) => !have.has(k));
      expect(missing, `acknowledged but missing after kill -9: ${missing.slice(0, 5).join(', ')}`).toEqual([]);
      expect((await store.check()).problems).toEqual([]);
      console.log(`LMTP crash test: ${acked.size} acknowledged deliveries all present after kill -9`);
    } finally {
      await store.close();
      await dev.close();
      dir.cleanup();
    }
  }, 60_000);
});
