/**
 * POP3 transport details of the store resource: STLS and implicit TLS (pop3s) with a real TLS
 * client, idle timeout, shutdown closing sessions with [SYS/TEMP], and readers not blocked by
 * a compaction running underneath.
 */
import net from 'node:net';
import tls from 'node:tls';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/log.ts';
import { createRegistry } from '../../common/metrics.ts';
import { FileBlockDevice } from '../../pair-agent/volume/block-device.ts';
import { createStoreResource, storeConfigSchema, type StoreResource } from '../../pair-agent/store/resource.ts';
import { freePort, waitFor } from '../helpers/net.ts';
import { tempDir } from '../helpers/proc.ts';
import { makeTestCert } from '../helpers/tls.ts';

const MASTER = { user: 'pm', secret: 'pop-master-secret' };
const auth = (u: string) => `AUTH PLAIN ${Buffer.from(`${u}\0${MASTER.user}\0${MASTER.secret}`).toString('base64')}\r\n`;
let dir: { path: string; cleanup(): void };
let device: FileBlockDevice;
let res: StoreResource;
let pop3s = 0;

/** Reads from a socket until `done`, bounded. */
function reader(sock: net.Socket | tls.TLSSocket) {
  let buf = '';
  let closed = false;
  const waiters: Array<() => void> = [];
  sock.on('data', (d: Buffer) => {
    buf += d.toString('latin1');
    for (const w of waiters.splice(0)) w();
  });
  sock.on('close', () => {
    closed = true;
    for (const w of waiters.splice(0)) w();
  });
  sock.on('error', () => undefined);
  return {
    async until(done: (t: string) => boolean, ms = 5000): Promise<string> {
      const deadline = Date.now() + ms;
      while (!done(buf)) {
        if (closed) return buf;
        if (Date.now() > deadline) throw new Error(`timeout, have ${JSON.stringify(buf.slice(-200))}`);
        await new Promise<void>((r) => {
          const t = setTimeout(r, 100);
          waiters.push(() => {
            clearTimeout(t);
            r();
          });
        });
      }
      const t = buf;
      buf = '';
      return t;
    },
    get closed() {
      return closed;
    },
  };
}

beforeAll(async () => {
  dir = tempDir('pairgate-store-tls-');
  const cert = makeTestCert(dir.path, 'store');
  device = await FileBlockDevice.open(join(dir.path, 'vol.img'), { size: 32 * 1024 * 1024, create: true });
  pop3s = await freePort();
  const config = storeConfigSchema.parse({
    ports: { lmtp: 0, pop3: 0, imap: 0, pop3s },
    masterUser: MASTER.user,
    masterSecret: MASTER.secret,
    tls: { cert: cert.certFile, key: cert.keyFile },
    idleTimeoutMs: { pop3: 2500 },
    compactBytesPerSec: 0,
  });
  res = createStoreResource({ config, device, listenHost: '127.0.0.1', log: silentLogger, registry: createRegistry({}, false) });
  await res.start();
  await res.store()!.deliver('t1', ['tlsuser'], Buffer.from('Subject: over TLS\r\n\r\nsecret body\r\n'));
});

afterAll(async () => {
  await res?.stop();
  await device?.close();
  dir?.cleanup();
});

describe('POP3 TLS and lifetimes', () => {
  it('STLS upgrades and the session continues over TLS', async () => {
    const sock = net.connect({ port: res.ports()!.pop3, host: '127.0.0.1' });
    const r = reader(sock);
    await r.until((t) => t.includes('\r\n'));
    sock.write('CAPA\r\n');
    expect(await r.until((t) => t.includes('\r\n.\r\n'))).toContain('STLS');
    sock.write('STLS\r\n');
    expect(await r.until((t) => t.includes('\r\n'))).toMatch(/^\+OK/);
    sock.removeAllListeners('data');
    const secure = tls.connect({ socket: sock, rejectUnauthorized: false });
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', resolve);
      secure.once('error', reject);
    });
    const s = reader(secure);
    secure.write('CAPA\r\n');
    expect(await s.until((t) => t.includes('\r\n.\r\n'))).not.toContain('STLS');
    secure.write(auth('tlsuser'));
    expect(await s.until((t) => t.includes('\r\n'))).toMatch(/^\+OK/);
    secure.write('RETR 1\r\n');
    expect(await s.until((t) => t.includes('\r\n.\r\n'))).toContain('secret body');
    secure.write('STLS\r\n');
    expect(await s.until((t) => t.includes('\r\n'))).toMatch(/^-ERR/);
    secure.write('QUIT\r\n');
    await s.until((t) => t.includes('\r\n'));
    secure.destroy();
  });

  it('serves implicit TLS on pop3s', async () => {
    const secure = tls.connect({ port: pop3s, host: '127.0.0.1', rejectUnauthorized: false });
    const s = reader(secure);
    expect(await s.until((t) => t.includes('\r\n'))).toMatch(/^\+OK/);
    secure.write(auth('tlsuser'));
    expect(await s.until((t) => t.includes('\r\n'))).toMatch(/^\+OK Logged in, 1 messages/);
    secure.destroy();
  });

  it('closes idle sessions and releases their maildrop lock', async () => {
    const sock = net.connect({ port: res.ports()!.pop3, host: '127.0.0.1' });
    const r = reader(sock);
    await r.until((t) => t.includes('\r\n'));
    sock.write(auth('idler'));
    expect(await r.until((t) => t.includes('\r\n'))).toMatch(/^\+OK/);
    const bye = await r.until(() => r.closed, 15_000);
    expect(bye).toMatch(/inactivity/);
    const again = net.connect({ port: res.ports()!.pop3, host: '127.0.0.1' });
    const a = reader(again);
    await a.until((t) => t.includes('\r\n'));
    again.write(auth('idler'));
    expect(await a.until((t) => t.includes('\r\n'))).toMatch(/^\+OK/);
    again.destroy();
  });

  it('closes slow clients: one that trickles bytes without finishing a line, one that never reads its RETR', async () => {
    // Trickle: a byte every 300 ms never makes a command; the idle timeout (2.5 s) still ends it.
    const slow = net.connect({ port: res.ports()!.pop3, host: '127.0.0.1' });
    const r = reader(slow);
    await r.until((t) => t.includes('\r\n'));
    let i = 0;
    const drip = setInterval(() => {
      if (!slow.destroyed) slow.write('CAPA'[i++ % 4]!);
    }, 300);
    try {
      expect(await r.until(() => r.closed, 10_000)).toMatch(/inactivity/);
    } finally {
      clearInterval(drip);
    }
    // Slow reader: a 4 MiB RETR the client does not read; the socket is closed after the idle timeout
    // and a grace period, instead of holding the session (and its lock and buffers) forever.
    await res.store()!.deliver('big-1', ['slowreader'], Buffer.from(`Subject: big\r\n\r\n${('r'.repeat(76) + '\r\n').repeat(52_000)}`));
    const lazy = net.connect({ port: res.ports()!.pop3, host: '127.0.0.1' });
    const lr = reader(lazy);
    await lr.until((t) => t.includes('\r\n'));
    lazy.write(auth('slowreader'));
    await lr.until((t) => t.includes('+OK Logged in'));
    lazy.pause(); // stop reading: TCP fills up, the server's writes back up
    lazy.write('RETR 1\r\n');
    await waitFor(() => res.sessions().pop3 === 1, 5000, 'the RETR session open');
    // (the paused client cannot see its socket close; the server's session count can)
    await waitFor(() => res.sessions().pop3 === 0, 12_000, 'the server to drop the session that does not read');
    lazy.destroy();
    // The maildrop lock went with the session.
    const again = net.connect({ port: res.ports()!.pop3, host: '127.0.0.1' });
    const a = reader(again);
    await a.until((t) => t.includes('\r\n'));
    again.write(auth('slowreader'));
    expect(await a.until((t) => t.includes('\r\n'))).toMatch(/^\+OK/);
    again.destroy();
  }, 30_000);

  it('keeps serving reads while a compaction runs', async () => {
    const st = res.store()!;
    for (let i = 0; i < 60; i++) await st.deliver(`c${i}`, ['compactee'], Buffer.from(`Subject: c${i}\r\n\r\n${'z'.repeat(40_000)}${i}\r\n`));
    const all = await st.listMessages('compactee', 'INBOX');
    await st.expunge('compactee', 'INBOX', all.filter((m) => m.uid % 4 !== 0).map((m) => m.uid));
    const keep = await st.listMessages('compactee', 'INBOX');
    const compaction = st.compact({ maxLiveRatio: 1, bytesPerSec: 4 * 1024 * 1024 });
    let reads = 0;
    const readers = (async () => {
      const t0 = Date.now();
      while (Date.now() - t0 < 3000) {
        for (const m of keep) {
          const b = await st.readMessage(m.bodyId);
          expect(b.toString('latin1')).toMatch(new RegExp(`Subject: c${m.uid - 1}\\r\\n`));
          reads++;
        }
        const done = await Promise.race([compaction.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 5))]);
        if (done) break;
      }
    })();
    const [result] = await Promise.all([compaction, readers]);
    expect(reads).toBeGreaterThan(0);
    expect(result.bodiesMoved).toBeGreaterThan(0);
    expect((await st.check()).problems).toEqual([]);
  });

  it('stop() closes sessions with [SYS/TEMP] and flushes; start() recovers', async () => {
    const sock = net.connect({ port: res.ports()!.pop3, host: '127.0.0.1' });
    const r = reader(sock);
    await r.until((t) => t.includes('\r\n'));
    sock.write(auth('tlsuser'));
    await r.until((t) => t.includes('\r\n'));
    await res.stop();
    expect(await r.until(() => r.closed, 5000)).toMatch(/\[SYS\/TEMP\]/);
    expect(await res.monitor()).toBe('stopped');
    await res.start();
    expect(await res.monitor()).toBe('running');
    expect(res.health()).toMatchObject({ running: true });
    expect(await res.store()!.listMessages('tlsuser', 'INBOX')).toHaveLength(1);
  });
});
