/**
 * Adversarial review of the LMTP server's ReadArena (pair-agent/store/read-arena.ts, lmtp.ts).
 *
 * The safety claim: once recycle() has pooled a slab, nothing refers to it, so another
 * connection may overwrite it at once. The "scribbler" below does exactly that, synchronously
 * after every recycle(): it takes every pooled slab and fills it with 0xFF. Anything that still
 * read from a pooled slab then shows up as a changed body.
 */
import net from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/log.ts';
import { createRegistry } from '../../common/metrics.ts';
import { AddressList } from '../../common/cidr.ts';
import { UnavailableError } from '../../common/errors.ts';
import { startLmtpServer, type LmtpServer } from '../../pair-agent/store/lmtp.ts';
import { ReadArena, SLAB_BYTES } from '../../pair-agent/store/read-arena.ts';
import type { BodyData, MailStore } from '../../pair-agent/store/types.ts';

/** A store that records each delivery's body (a copy, taken when deliver() is called) and lets the test decide when and how it settles. */
class FakeStore {
  bodies: Buffer[] = [];
  gates: Array<{ resolve: () => void; reject: (e: unknown) => void }> = [];
  hold = false;
  failNext = false;
  async deliver(_id: string, users: string[], given: BodyData) {
    const parts = Buffer.isBuffer(given) ? [given] : given;
    this.bodies.push(Buffer.concat(parts));
    if (this.failNext) {
      this.failNext = false;
      throw new UnavailableError('store log write failed (test)');
    }
    if (this.hold) await new Promise<void>((resolve, reject) => this.gates.push({ resolve, reject }));
    return users.map((user, i) => ({ user, ok: true as const, uid: i + 1 }));
  }
}

class Client {
  buf = '';
  private waiters: Array<() => void> = [];
  constructor(readonly sock: net.Socket) {
    sock.setNoDelay(true);
    sock.on('data', (d: Buffer) => {
      this.buf += d.toString('latin1');
      for (const w of this.waiters.splice(0)) w();
    });
  }
  static async open(port: number): Promise<Client> {
    const sock = net.connect(port, '127.0.0.1');
    await new Promise<void>((r, j) => sock.once('connect', r).once('error', j));
    return new Client(sock);
  }
  /** Waits until `n` complete reply lines (final lines of multi-line replies included) have arrived; returns and consumes them. */
  async lines(n: number, ms = 10_000): Promise<string[]> {
    const deadline = Date.now() + ms;
    for (;;) {
      const all = this.buf.split('\r\n');
      const done = all.slice(0, -1).filter((l) => /^\d{3} /.test(l));
      if (done.length >= n) {
        // consume up to the n-th final line
        let k = 0;
        let idx = 0;
        for (; idx < all.length - 1 && k < n; idx++) if (/^\d{3} /.test(all[idx]!)) k++;
        this.buf = all.slice(idx).join('\r\n');
        return done.slice(0, n);
      }
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${n} replies; have ${JSON.stringify(this.buf)}`);
      await new Promise<void>((r) => {
        this.waiters.push(r);
        setTimeout(r, 50);
      });
    }
  }
  write(s: string | Buffer): Promise<void> {
    return new Promise((r) => this.sock.write(s, () => r()));
  }
}

const pause = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Body text of exactly `size` bytes, CRLF lines, no line starting with a dot (nothing to stuff). */
function bodyOf(size: number, tag: string): string {
  let out = '';
  let i = 0;
  while (out.length < size) {
    const line = `${tag} line ${i++} ` + 'x'.repeat(60) + '\r\n';
    out += line;
  }
  out = out.slice(0, size - 2) + '\r\n';
  return out;
}

let server: LmtpServer | null = null;
const recycle = ReadArena.prototype.recycle;
afterEach(async () => {
  ReadArena.prototype.recycle = recycle;
  await server?.close();
  server = null;
});

/** After every recycle(), every pooled slab is taken and overwritten, as another connection may do at once. */
function scribbleAfterRecycle(): void {
  ReadArena.prototype.recycle = function (this: ReadArena) {
    recycle.call(this);
    const thief = new ReadArena();
    for (let i = 0; i < 80; i++) {
      const b = thief.next();
      b.fill(0xff);
      thief.took(b.length);
    }
    thief.abandon();
  };
}

async function start(store: FakeStore): Promise<LmtpServer> {
  server = await startLmtpServer({
    store: store as unknown as MailStore,
    host: '127.0.0.1',
    port: 0,
    log: silentLogger,
    registry: createRegistry({}, false),
    trusted: new AddressList(['127.0.0.0/8']),
  });
  return server;
}

describe('ReadArena under LMTP (review)', () => {
  it('a failed delivery (abandon) does not break the connection: the next command is answered and the next message stored intact', async () => {
    const store = new FakeStore();
    const srv = await start(store);
    const c = await Client.open(srv.port);
    await c.lines(1); // banner
    await c.write('LHLO review\r\n');
    await c.lines(1);
    store.failNext = true;
    await c.write('MAIL FROM:<a@b>\r\nRCPT TO:<u1@example.net>\r\nDATA\r\n');
    expect(await c.lines(3)).toEqual([expect.stringMatching(/^250/), expect.stringMatching(/^250/), expect.stringMatching(/^354/)]);
    await c.write(bodyOf(1000, 'failed') + '.\r\n');
    expect((await c.lines(1))[0]).toMatch(/^451/);
    // The delivery was refused: its slabs are abandoned. The connection must go on reading.
    await c.write('RSET\r\n');
    expect((await c.lines(1))[0]).toMatch(/^250/);
    const m = bodyOf(100_000, 'after');
    await c.write('MAIL FROM:<a@b>\r\nRCPT TO:<u2@example.net>\r\nDATA\r\n');
    expect((await c.lines(3))[2]).toMatch(/^354/);
    await c.write(m + '.\r\n');
    expect((await c.lines(1))[0]).toMatch(/^250/);
    expect(store.bodies[1]!.toString('latin1')).toBe(m);
    c.sock.destroy();
  });

  it('bytes still waiting for the parser are not pooled at the next DATA after an earlier message was sent ahead of its 354', async () => {
    scribbleAfterRecycle();
    const store = new FakeStore();
    const srv = await start(store);
    const c = await Client.open(srv.port);
    await c.lines(1);
    let sent = 0;
    const send = async (s: string) => {
      sent += Buffer.byteLength(s, 'latin1');
      await c.write(Buffer.from(s, 'latin1'));
    };
    await send('LHLO review\r\n');
    await c.lines(1);
    // The bytes the connection reads are laid out back to back in its first slab; it is retired
    // at the read after which fewer than 64 KiB of it are left.
    const retireAbove = SLAB_BYTES - 64 * 1024;
    const env = (i: number) => `MAIL FROM:<a@b>\r\nRCPT TO:<m${i}@example.net>\r\nDATA\r\n`;
    // Message 1 (below): envelope and message in one write, ahead of its 354: the R bytes after DATA.
    const m1 = bodyOf(2000, 'ahead');
    const write1 = env(1) + m1 + '.\r\n';
    const R = m1.length + 3;
    // Message 2: its envelope (A), then its first R bytes (B), read while message 1 is being delivered.
    const m2 = bodyOf(20_000, 'second');
    const A = env(2);
    const B = m2.slice(0, R);
    // Message 0 fills the slab so that B's read is the one that retires it.
    const target = retireAbove - 100 - Buffer.byteLength(write1) - Buffer.byteLength(A);
    const m0 = bodyOf(target - sent - env(0).length - 3, 'fill');
    await send(env(0));
    expect((await c.lines(3))[2]).toMatch(/^354/);
    await send(m0 + '.\r\n');
    expect((await c.lines(1))[0]).toMatch(/^250/);
    store.hold = true;
    await send(write1);
    expect(await c.lines(3)).toEqual([expect.stringMatching(/^250/), expect.stringMatching(/^250/), expect.stringMatching(/^354/)]);
    while (store.gates.length === 0) await pause(5);
    await send(A);
    await pause(50);
    await send(B);
    await pause(50);
    expect(sent).toBeGreaterThan(retireAbove);
    expect(sent - R).toBeLessThanOrEqual(retireAbove);
    store.hold = false;
    store.gates.shift()!.resolve();
    expect(await c.lines(4)).toEqual(['250', '250', '250', '354'].map((x) => expect.stringMatching(new RegExp(`^${x}`))));
    await send(m2.slice(R) + '.\r\n');
    expect((await c.lines(1))[0]).toMatch(/^250/);
    expect(store.bodies.map((b) => b.toString('latin1'))).toEqual([m0, m1, m2]);
    c.sock.destroy();
  });
  it('the counts stay exact: after messages sent ahead of their 354 and behind a final dot, a later DATA still pools (handed === taken)', async () => {
    const seen: boolean[] = [];
    ReadArena.prototype.recycle = function (this: ReadArena) {
      const a = this as unknown as { handed: number; taken: number };
      seen.push(a.handed === a.taken);
      recycle.call(this);
    };
    const store = new FakeStore();
    const srv = await start(store);
    const c = await Client.open(srv.port);
    await c.lines(1);
    await c.write('LHLO review\r\n');
    await c.lines(1);
    const env = (i: number) => `MAIL FROM:<a@b>\r\nRCPT TO:<k${i}@example.net>\r\nDATA\r\n`;
    const bodies = [bodyOf(3000, 'k0'), bodyOf(70_000, 'k1'), bodyOf(5000, 'k2'), bodyOf(300, 'k3')];
    // 0: ahead of its 354; 1 and 2: 2's envelope and body right behind 1's final dot; 3: plain.
    await c.write(env(0) + bodies[0] + '.\r\n');
    expect(await c.lines(4)).toHaveLength(4);
    await c.write(env(1));
    await c.lines(3);
    await c.write(bodies[1] + '.\r\n' + env(2) + bodies[2] + '.\r\n');
    expect(await c.lines(5)).toHaveLength(5);
    await pause(20);
    await c.write(env(3));
    await c.lines(3);
    await c.write(bodies[3] + '.\r\n');
    await c.lines(1);
    expect(store.bodies.map((b) => b.toString('latin1'))).toEqual(bodies);
    expect(seen).toHaveLength(4);
    expect(seen[3]).toBe(true);
    c.sock.destroy();
  });
});
