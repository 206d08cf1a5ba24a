/**
 * The native relay (common/native) over real loopback sockets: both directions, half-close,
 * backpressure with a bulk transfer, resets on either side, the idle and grace bounds, detach,
 * and what it refuses to take (TLS, bytes still in Node's buffers). Each test builds a "client"
 * and a "backend" pair of connected sockets as the proxy has them after a login: the proxy-side
 * ends are lent, the far ends play the mail client and the pair.
 */
import { createHash, randomBytes } from 'node:crypto';
import net from 'node:net';
import tls from 'node:tls';
import { afterEach, describe, expect, it } from 'vitest';
import { lendToNativeRelay, nativeRelayLive, nativeRelayStatus, nativeRelayTestHold, readAgain, type NativeRelayEnd } from '../../common/native-relay.ts';

interface Link {
  /** The proxy's socket (lent) and the far end (the test's client or pair). */
  near: net.Socket;
  far: net.Socket;
}

const open: net.Socket[] = [];
const servers: net.Server[] = [];

/** A connected loopback pair: `near` as accepted by a server (like the proxy's client socket), `far` the connecting side. */
async function link(opts: { nearIsConnector?: boolean } = {}): Promise<Link> {
  const server = net.createServer({ allowHalfOpen: true });
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
  const connector = net.connect({ port: (server.address() as net.AddressInfo).port, host: '127.0.0.1', allowHalfOpen: true });
  await new Promise<void>((r, j) => connector.once('connect', r).once('error', j));
  const acceptor = await accepted;
  open.push(connector, acceptor);
  return opts.nearIsConnector ? { near: connector, far: acceptor } : { near: acceptor, far: connector };
}

/** Lends client.near and backend.near; resolves the relay's end report. */
async function lend(idleMs = 0, graceMs = 5000) {
  const client = await link();
  const backend = await link({ nearIsConnector: true });
  let resolveEnd!: (e: NativeRelayEnd) => void;
  const ended = new Promise<NativeRelayEnd>((r) => (resolveEnd = r));
  const lent = lendToNativeRelay(client.near, backend.near, { idleMs, graceMs }, resolveEnd);
  expect(lent).not.toBeNull();
  return { client, backend, lent: lent!, ended };
}

function readAll(s: net.Socket): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    s.on('data', (d: Buffer) => parts.push(d));
    s.once('end', () => resolve(Buffer.concat(parts)));
    s.once('error', reject);
    s.resume();
  });
}

function nextData(s: net.Socket, bytes: number): Promise<Buffer> {
  return new Promise((resolve) => {
    const parts: Buffer[] = [];
    let n = 0;
    const on = (d: Buffer) => {
      parts.push(d);
      n += d.length;
      if (n >= bytes) {
        s.off('data', on);
        s.pause();
        resolve(Buffer.concat(parts));
      }
    };
    s.on('data', on);
    s.resume();
  });
}

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

afterEach(async () => {
  for (const s of open.splice(0)) s.destroy();
  for (const s of servers.splice(0)) s.close();
});

describe('native relay', () => {
  it('is built here (npm ci builds it; `npm run build:native` by hand)', () => {
    expect(nativeRelayStatus()).toEqual({ available: true, reason: null });
  });

  it('relays both ways, passes each FIN on after the bytes before it, and reports who closed first and the byte counts', async () => {
    const { client, backend, lent, ended } = await lend();
    const [select, answer, logout, bye] = ['a1 SELECT INBOX\r\n', '* 1 EXISTS\r\na1 OK done\r\n', 'a2 LOGOUT\r\n', '* BYE\r\na2 OK bye\r\n'];
    client.far.write(select);
    expect((await nextData(backend.far, select.length)).toString()).toBe(select);
    backend.far.write(answer);
    expect((await nextData(client.far, answer.length)).toString()).toBe(answer);
    expect(lent.counters()).toEqual({ bytesIn: select.length, bytesOut: answer.length });
    // The client half-closes: the pair sees its FIN, answers, and closes; the client gets it all.
    const atBackend = readAll(backend.far);
    client.far.end(logout);
    expect((await atBackend).toString()).toBe(logout);
    const atClient = readAll(client.far);
    backend.far.end(bye);
    expect((await atClient).toString()).toBe(bye);
    const end = await ended;
    expect(end).toMatchObject({ reason: 'closed', firstClosed: 'client', bytesIn: select.length + logout.length, bytesOut: answer.length + bye.length, code: null });
    expect(lent.counters()).toBeNull();
    expect(nativeRelayLive()).toBe(0);
  });

  it('moves 24 MiB from the pair to a client that stops reading for a while, intact, and 4 MiB the other way at once', async () => {
    const { client, backend, ended } = await lend();
    const down = randomBytes(24 * 1024 * 1024);
    const up = randomBytes(4 * 1024 * 1024);
    const gotUp = readAll(backend.far);
    client.far.pause();
    backend.far.end(down);
    client.far.end(up);
    // Backpressure: with the client not reading, the pair's writes stall instead of the relay buffering 24 MiB.
    await new Promise((r) => setTimeout(r, 400));
    expect(backend.far.writableLength).toBeGreaterThan(0);
    const gotDown = readAll(client.far);
    expect(sha(await gotDown)).toBe(sha(down));
    expect(sha(await gotUp)).toBe(sha(up));
    expect(await ended).toMatchObject({ reason: 'closed', bytesIn: up.length, bytesOut: down.length });
  });

  it('a pair that resets: ended as an error on the backend side, the client socket left for the caller', async () => {
    const { client, backend, ended } = await lend();
    client.far.write('a1 FETCH 1 BODY[]\r\n');
    await nextData(backend.far, 19);
    backend.far.resetAndDestroy();
    const end = await ended;
    expect(end).toMatchObject({ reason: 'error', side: 'backend', code: 'ECONNRESET' });
    // The relay did not touch the client: the caller can still say goodbye on it.
    client.near.write('* BYE backend lost\r\n');
    expect((await nextData(client.far, 20)).toString()).toBe('* BYE backend lost\r\n');
  });

  it('a client that half-closes and then resets while the pair is quiet: ended at once (no spinning on the hang-up)', async () => {
    const { client, ended } = await lend();
    client.far.end();
    await new Promise((r) => setTimeout(r, 100));
    const cpuBefore = process.cpuUsage();
    client.far.resetAndDestroy();
    const end = await ended;
    expect(end.reason).toBe('error');
    expect(end.side).toBe('client');
    // The relay thread is in this process: a spin would show as a second of CPU per second.
    await new Promise((r) => setTimeout(r, 300));
    const used = process.cpuUsage(cpuBefore);
    expect((used.user + used.system) / 1000).toBeLessThan(250);
  });

  it('a client that half-closed and stopped reading while the pair sends its last bytes and closes: no spinning on the pair\'s hang-up', async () => {
    const { client, backend, lent, ended } = await lend();
    client.far.pause();
    client.far.end(); // passed on: the pair's socket is shut for writing
    await new Promise((r) => {
      backend.far.once('end', r);
      backend.far.resume();
    });
    // The pair writes until the client path is full (the relay then holds bytes for the client),
    // then closes: its socket hangs up (both FINs) while the relay still has bytes to deliver.
    const sent: Buffer[] = [];
    let lastOut = -1;
    for (;;) {
      const chunk = randomBytes(64 * 1024);
      sent.push(chunk);
      backend.far.write(chunk);
      await new Promise((r) => setTimeout(r, 30));
      const out = lent.counters()!.bytesOut;
      if (out === lastOut) break;
      lastOut = out;
    }
    backend.far.end();
    await new Promise((r) => setTimeout(r, 300));
    const cpuBefore = process.cpuUsage();
    await new Promise((r) => setTimeout(r, 600));
    const used = process.cpuUsage(cpuBefore);
    const got = readAll(client.far);
    expect(sha(await got)).toBe(sha(Buffer.concat(sent)));
    expect((await ended).reason).toBe('closed');
    // The relay thread is in this process: a spin would show as ~600 ms of CPU in 600 ms.
    expect((used.user + used.system) / 1000).toBeLessThan(200);
  });

  it('idle: nothing moved for idleMs ends the session with both sockets open (the caller sends the goodbye)', async () => {
    const { client, backend, ended } = await lend(300);
    const t0 = Date.now();
    const end = await ended;
    expect(end.reason).toBe('idle');
    expect(Date.now() - t0).toBeGreaterThanOrEqual(300);
    expect(Date.now() - t0).toBeLessThan(3000);
    client.near.write('* BYE idle\r\n');
    expect((await nextData(client.far, 12)).toString()).toBe('* BYE idle\r\n');
    // And the relay no longer moves bytes: what the client sends stays unread by anyone.
    let seen = 0;
    backend.far.on('data', (d: Buffer) => (seen += d.length));
    client.far.write('late\r\n');
    await new Promise((r) => setTimeout(r, 200));
    expect(seen).toBe(0);
  });

  it('grace: after the pair closed, a client that does not close is given back after graceMs', async () => {
    const { client, backend, ended } = await lend(0, 200);
    const atClient = readAll(client.far);
    backend.far.end('* BYE\r\n');
    expect((await atClient).toString()).toBe('* BYE\r\n');
    const end = await ended;
    expect(end).toMatchObject({ reason: 'grace', firstClosed: 'backend', bytesOut: 7 });
  });

  it('detach: the session is the caller\'s again at once, with the byte counts; its end is never reported', async () => {
    const { client, backend, lent, ended } = await lend();
    client.far.write('abc');
    await nextData(backend.far, 3);
    const back = lent.detach();
    expect(back).toMatchObject({ bytesIn: 3, bytesOut: 0 });
    expect(lent.detach()).toBeNull();
    let reported = false;
    void ended.then(() => (reported = true));
    // Node reads the client again; the relay does not.
    const fromClient = nextData(client.near, 4);
    readAgain(client.near);
    client.far.write('more');
    expect((await fromClient).toString()).toBe('more');
    await new Promise((r) => setTimeout(r, 200));
    expect(reported).toBe(false);
    expect(nativeRelayLive()).toBe(0);
  });

  it('detach just after the relay finished the session, its end not yet delivered: the counts, and the end never reported', async () => {
    const { client, backend, lent, ended } = await lend();
    let reported = false;
    void ended.then(() => (reported = true));
    client.far.end('abc');
    backend.far.end('defgh');
    await new Promise((r) => setImmediate(r)); // the FINs leave in this loop turn's poll phase
    // Keep the event loop from delivering while the relay thread sees both FINs and finishes.
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 300);
    expect(nativeRelayLive()).toBe(0);
    expect(lent.detach()).toMatchObject({ bytesIn: 3, bytesOut: 5 });
    expect(lent.detach()).toBeNull();
    await new Promise((r) => setTimeout(r, 100));
    expect(reported).toBe(false);
  });

  it('an event the thread took for a session detached meanwhile is not applied to a new session given its slot', async () => {
    const a = await lend();
    try {
      // The thread wakes for A's reset and, held, acts on it only after A was detached and B attached.
      nativeRelayTestHold(400);
      a.client.far.resetAndDestroy();
      await new Promise((r) => setTimeout(r, 100));
      expect(a.lent.detach()).not.toBeNull();
      const b = await lend(); // the slot A freed is the next one given out
      nativeRelayTestHold(0);
      let reported: NativeRelayEnd | null = null;
      void b.ended.then((e) => (reported = e));
      await new Promise((r) => setTimeout(r, 600));
      expect(reported).toBeNull();
      b.client.far.write('still here');
      expect((await nextData(b.backend.far, 10)).toString()).toBe('still here');
      expect(b.lent.detach()).not.toBeNull();
    } finally {
      nativeRelayTestHold(0);
    }
  });

  it('refuses what it cannot relay: a TLS socket, and a socket with bytes still in Node\'s buffer', async () => {
    const backend = await link({ nearIsConnector: true });
    const plain = await link();
    const wrapped = new tls.TLSSocket(plain.near);
    expect(lendToNativeRelay(wrapped, backend.near, { idleMs: 0, graceMs: 1000 }, () => undefined)).toBeNull();
    const buffered = await link();
    buffered.near.pause();
    buffered.far.write('pipelined');
    await new Promise((r) => setTimeout(r, 100));
    buffered.near.read(0); // let Node pull the bytes into the stream's buffer
    await new Promise((r) => setTimeout(r, 50));
    expect(buffered.near.readableLength).toBeGreaterThan(0);
    expect(lendToNativeRelay(buffered.near, backend.near, { idleMs: 0, graceMs: 1000 }, () => undefined)).toBeNull();
    expect(nativeRelayLive()).toBe(0);
    wrapped.destroy();
  });

  it('an attach the relay refuses (here: a fd it relays already) changes nothing: null, and Node still reads the sockets', async () => {
    const a = await lend();
    const other = await link({ nearIsConnector: true });
    let r: unknown;
    expect(() => (r = lendToNativeRelay(a.client.near, other.near, { idleMs: 0, graceMs: 1000 }, () => undefined))).not.toThrow();
    expect(r).toBeNull();
    const got = nextData(other.near, 2);
    other.far.write('hi');
    expect((await got).toString()).toBe('hi');
    // And the session already lent goes on.
    a.client.far.write('abc');
    expect((await nextData(a.backend.far, 3)).toString()).toBe('abc');
    expect(nativeRelayLive()).toBe(1);
    a.lent.detach();
  });

  it('200 sessions at once, each echoing through its pair, all end and leave nothing lent', async () => {
    const sessions = await Promise.all(Array.from({ length: 200 }, () => lend()));
    await Promise.all(
      sessions.map(async ({ client, backend, ended }, i) => {
        backend.far.on('data', (d: Buffer) => backend.far.write(d));
        backend.far.on('end', () => backend.far.end());
        const msg = `${i} `.repeat(50);
        const got = readAll(client.far);
        client.far.end(msg);
        expect((await got).toString()).toBe(msg);
        expect((await ended).reason).toBe('closed');
      }),
    );
    expect(nativeRelayLive()).toBe(0);
  });
});
