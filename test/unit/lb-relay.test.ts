/**
 * common/relay.ts (the balancer's splice): integrity of large transfers both ways at once
 * (SHA-256), backpressure from a slow reader (bounded buffering, then every byte), half-close
 * both ways, bytes that arrive before the relay starts, small exchanges (no bulk buffers taken),
 * the bulk-mode bound, and the byte counters the balancer's metrics read.
 */
import { createHash, randomBytes } from 'node:crypto';
import net from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { ReadPump, bulkPumpsInUse, relay, setMaxBulkPumps } from '../../common/relay.ts';
import { sleep, waitFor } from '../helpers/net.ts';

interface Pair {
  /** The test's client, connected to the relay's accepted socket. */
  client: net.Socket;
  /** The backend's accepted socket, connected from the relay's pumped socket. */
  backend: net.Socket;
  /** The relay's two sockets. */
  front: net.Socket;
  back: net.Socket;
  start(): void;
}

const closers: Array<() => void> = [];
afterEach(() => {
  for (const c of closers.splice(0)) c();
});

/** A listener on an ephemeral port and its first accepted socket. */
async function listen(opts: net.ServerOpts = {}): Promise<{ port: number; accepted: Promise<net.Socket> }> {
  let accept!: (s: net.Socket) => void;
  const accepted = new Promise<net.Socket>((r) => (accept = r));
  const srv = net.createServer({ allowHalfOpen: true, ...opts }, (s) => {
    closers.push(() => s.destroy());
    accept(s);
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  closers.push(() => srv.close());
  return { port: (srv.address() as net.AddressInfo).port, accepted };
}

/** client -> front (accepted: the pipe direction) | relay | back (through a ReadPump) -> backend. `start()` begins relaying. */
async function pair(options: { bulkBufferBytes?: number; beforeStart?: (backend: net.Socket) => void } = {}): Promise<Pair> {
  const frontSrv = await listen({ pauseOnConnect: true });
  const backendSrv = await listen();
  const client = net.connect({ port: frontSrv.port, host: '127.0.0.1', allowHalfOpen: true });
  closers.push(() => client.destroy());
  const front = await frontSrv.accepted;
  const pump = new ReadPump({ bulkBufferBytes: options.bulkBufferBytes });
  const back = net.connect({ port: backendSrv.port, host: '127.0.0.1', allowHalfOpen: true, onread: pump.onread } as net.NetConnectOpts);
  closers.push(() => back.destroy());
  await new Promise((r) => back.once('connect', r));
  const backend = await backendSrv.accepted;
  for (const s of [client, backend, front, back]) s.on('error', () => {});
  options.beforeStart?.(backend);
  return { client, backend, front, back, start: () => relay(front, back, { bPump: pump }) };
}

/** Reads a socket to its end: total bytes and SHA-256. */
function drain(s: net.Socket): Promise<{ bytes: number; sha: string }> {
  const h = createHash('sha256');
  let bytes = 0;
  return new Promise((resolve, reject) => {
    s.on('data', (d: Buffer) => {
      bytes += d.length;
      h.update(d);
    });
    s.once('end', () => resolve({ bytes, sha: h.digest('hex') }));
    s.once('error', reject);
  });
}

/** Writes `total` seeded-random bytes in uneven chunks with backpressure, then ends; returns the SHA-256 of what was sent. */
async function send(s: net.Socket, total: number, seed: number): Promise<string> {
  const h = createHash('sha256');
  const block = randomBytes(1 << 20);
  let sent = 0;
  let i = seed;
  while (sent < total) {
    i = (i * 1103515245 + 12345) % 2 ** 31;
    const len = Math.min(total - sent, 1 + (i % (1 << 20)));
    const off = i % (block.length - len + 1);
    const chunk = block.subarray(off, off + len);
    h.update(chunk);
    sent += len;
    if (!s.write(chunk)) await new Promise((r) => s.once('drain', r));
  }
  s.end();
  return h.digest('hex');
}

describe('relay', () => {
  it('moves 48 MiB backend -> client and 16 MiB client -> backend at once, byte for byte (SHA-256)', async () => {
    const p = await pair();
    p.start();
    const toClient = drain(p.client);
    const toBackend = drain(p.backend);
    const [shaDown, shaUp] = await Promise.all([send(p.backend, 48 << 20, 7), send(p.client, 16 << 20, 11)]);
    const down = await toClient;
    const up = await toBackend;
    expect(down).toEqual({ bytes: 48 << 20, sha: shaDown });
    expect(up).toEqual({ bytes: 16 << 20, sha: shaUp });
    // The counters the balancer's byte metrics read at close.
    expect(p.back.bytesRead).toBe(48 << 20);
    expect(p.front.bytesRead).toBe(16 << 20);
  });

  it('keeps integrity when no pump may take bulk buffers (shared buffer and copies only)', async () => {
    const prev = setMaxBulkPumps(0);
    try {
      const p = await pair();
      p.start();
      // A reader that stops and goes on, so that writes queue behind reads into the shared buffer.
      p.client.pause();
      const sending = send(p.backend, 24 << 20, 3);
      await sleep(200);
      const got = drain(p.client);
      p.client.resume();
      expect(await got).toEqual({ bytes: 24 << 20, sha: await sending });
      expect(bulkPumpsInUse()).toBe(0);
    } finally {
      setMaxBulkPumps(prev);
    }
  });

  it('backpressure: a client that does not read stops the backend with bounded buffering, then gets every byte', async () => {
    const bulk = 256 * 1024;
    const p = await pair({ bulkBufferBytes: bulk });
    p.start();
    p.client.pause();
    const total = 64 << 20;
    const sending = send(p.backend, total, 5);
    await sleep(500);
    // Bytes the relay took in but has not handed to the kernel: at most its two bulk buffers.
    const first = p.back.bytesRead;
    expect(p.front.writableLength).toBeLessThanOrEqual(2 * bulk);
    expect(first).toBeLessThan(total / 2);
    await sleep(300);
    // Stalled: nothing more is read while the client does not read.
    expect(p.back.bytesRead).toBe(first);
    const got = drain(p.client);
    p.client.resume();
    const sha = await sending;
    expect(await got).toEqual({ bytes: total, sha });
  });

  it('half-close: a FIN each way is passed on after the data before it, and the other direction keeps flowing', async () => {
    const p = await pair();
    p.start();
    // Backend finishes first (the pumped direction): the client sees the end, and can still send.
    const clientGot = drain(p.client);
    p.backend.end('bye from backend');
    expect(await clientGot).toMatchObject({ bytes: 16 });
    const backendGot: Buffer[] = [];
    p.backend.on('data', (d: Buffer) => backendGot.push(d));
    const backendEnd = new Promise((r) => p.backend.once('end', r));
    p.client.end('last words from the client');
    await backendEnd;
    expect(Buffer.concat(backendGot).toString()).toBe('last words from the client');

    // And the other way round on a new pair: the client finishes first.
    const q = await pair();
    q.start();
    const upGot = drain(q.backend);
    q.client.end('request');
    expect(await upGot).toMatchObject({ bytes: 7 });
    const downGot = drain(q.client);
    const big = randomBytes(3 << 20);
    q.backend.end(big);
    expect((await downGot).sha).toBe(createHash('sha256').update(big).digest('hex'));
  });

  it('bytes the backend sends before the relay starts (a greeting) come first, in order', async () => {
    const greeting = Buffer.from('* OK greeting\r\n');
    const q = await pair({ beforeStart: (b) => b.write(greeting) });
    const chunks: Buffer[] = [];
    q.client.on('data', (d: Buffer) => chunks.push(d));
    await sleep(100); // read by the pump (held) before the relay starts
    q.start();
    q.backend.end('* BYE\r\n');
    await new Promise((r) => q.client.once('end', r));
    expect(Buffer.concat(chunks).toString()).toBe('* OK greeting\r\n* BYE\r\n');
  });

  it('small exchanges stay on the shared buffer; bulk buffers are given back at close', async () => {
    const p = await pair();
    p.start();
    p.backend.on('data', (d: Buffer) => p.backend.write(d));
    for (let i = 0; i < 200; i++) {
      const line = `ping ${i}\n`;
      const echo = new Promise<string>((r) => p.client.once('data', (d: Buffer) => r(d.toString())));
      p.client.write(line);
      expect(await echo).toBe(line);
    }
    expect(bulkPumpsInUse()).toBe(0);
    // A bulk stream takes a slot; closing gives it back.
    const q = await pair();
    q.start();
    q.client.pause();
    q.backend.write(randomBytes(8 << 20));
    await waitFor(() => bulkPumpsInUse() === 1);
    q.client.destroy();
    q.backend.destroy();
    await waitFor(() => q.back.destroyed || q.front.destroyed);
    q.back.destroy();
    q.front.destroy();
    await waitFor(() => bulkPumpsInUse() === 0);
  });
});
