/**
 * The store agent as a pair resource: two real pair-agents share one disk file (shared-disk mode,
 * one writer kept so by fencing); the primary serves LMTP and POP3 on the floating address. A
 * message delivered before a SIGKILL of the primary is served by the new primary after failover.
 */
import net from 'node:net';
import { join } from 'node:path';
import nodemailer from 'nodemailer';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort, waitFor } from '../helpers/net.ts';
import { startPair, type TestPair } from './pair-agent-harness.ts';

let pair: TestPair;
let ports: { lmtp: number; pop3: number; imap: number };

beforeAll(async () => {
  ports = { lmtp: await freePort(), pop3: await freePort(), imap: await freePort() };
  const node = (dir: string) => ({
    sharedDisk: { file: join(dir, 'shared.disk'), sizeBytes: 16 * 1024 * 1024 },
    store: { ports, masterUser: 'proxy-master', masterSecret: 'master-secret-123', users: { alice: 'alice-password' }, cacheBytes: 1024 * 1024, compactBytesPerSec: 0 },
  });
  pair = await startPair({ a: node, b: node });
}, 60_000);
afterAll(async () => {
  await pair?.stop();
});

/** A minimal POP3 client: login, STAT, QUIT; resolves the message count. */
function pop3Count(host: string, port: number): Promise<number> {
  return new Promise((resolve, reject) => {
    const sock = net.connect({ host, port });
    const cmds = ['USER alice', 'PASS alice-password', 'STAT', 'QUIT'];
    let buf = '';
    let count = -1;
    sock.setTimeout(5000, () => {
      sock.destroy();
      reject(new Error('pop3 timeout'));
    });
    sock.on('data', (d) => {
      buf += d.toString();
      let i;
      while ((i = buf.indexOf('\r\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 2);
        if (!line.startsWith('+OK')) {
          sock.destroy();
          reject(new Error(`pop3: ${line}`));
          return;
        }
        const m = /^\+OK (\d+) \d+/.exec(line);
        if (m && count < 0 && cmds.length === 1) count = Number(m[1]);
        const next = cmds.shift();
        if (next) sock.write(`${next}\r\n`);
      }
    });
    sock.on('close', () => (count >= 0 ? resolve(count) : reject(new Error('pop3 closed early'))));
    sock.on('error', reject);
  });
}

describe('pair-agent with the store resource', () => {
  it('the primary serves LMTP and POP3 on the floating address; the mail survives a failover', async () => {
    expect(await pair.waitPrimary()).toBe('a');
    const lmtp = nodemailer.createTransport({ host: pair.address, port: ports.lmtp, lmtp: true, ignoreTLS: true, connectionTimeout: 5000 });
    const info = await lmtp.sendMail({ from: 'sender@example.net', to: 'alice@pair-t', subject: 'before failover', text: 'hello' });
    expect(info.accepted).toEqual(['alice@pair-t']);
    expect(await pop3Count(pair.address, ports.pop3)).toBe(1);
    const h = await pair.floatingHealth();
    expect(h?.body).toMatchObject({ primary: 'a' });
    pair.a.proc!.kill('SIGKILL');
    await waitFor(async () => (await pair.floatingHealth(200))?.body.primary === 'b', 15_000, 'b primary');
    expect(await pop3Count(pair.address, ports.pop3)).toBe(1);
    const after = (await pair.floatingHealth())!.body as unknown as { store: { messages: number } };
    expect(after.store.messages).toBe(1);
  });
});
