/**
 * A text-protocol client for connection-lifecycle tests (IMAP, POP3, SMTP): what it reads piles
 * up in `buf` for `until()`, it can upgrade with STARTTLS/STLS, and it can end in the three ways
 * a connection ends (the server says goodbye, the client closes, the client resets). It can also
 * reach an implicit-TLS port "through a load balancer": the PROXY v2 header and the ClientHello
 * in one segment, as HAProxy sends them.
 */
import net from 'node:net';
import tls from 'node:tls';
import { Duplex } from 'node:stream';
import { buildProxyHeader } from '../../loadbalancer/proxy-header.ts';
import { waitFor } from './net.ts';

export type End = 'close' | 'reset' | 'server';

export class LineClient {
  buf = '';
  closed = false;
  constructor(
    readonly raw: net.Socket,
    public sock: net.Socket,
  ) {
    this.listen(sock);
    raw.on('error', () => undefined);
    raw.on('close', () => (this.closed = true));
  }

  private listen(s: net.Socket): void {
    s.setEncoding('latin1');
    s.on('data', (d: string) => (this.buf += d));
    s.on('error', () => undefined);
  }

  async until(re: RegExp, timeoutMs = 5000): Promise<void> {
    await waitFor(() => re.test(this.buf) || undefined, timeoutMs, `${re} in ${JSON.stringify(this.buf)}`, 5);
  }

  /** TLS over the plain socket, after the server's OK to STARTTLS/STLS; `buf` starts again. */
  async starttls(): Promise<void> {
    this.raw.removeAllListeners('data');
    const s = tls.connect({ socket: this.raw, rejectUnauthorized: false });
    await new Promise<void>((resolve, reject) => {
      s.once('secureConnect', resolve);
      s.once('error', reject);
    });
    this.sock = s;
    this.buf = '';
    this.listen(s);
  }

  /** Ends the connection as `how` says (`server`: sends `quit` and lets the server close) and waits until it has. */
  async end(how: End, quit: string): Promise<void> {
    if (how === 'reset') this.raw.resetAndDestroy();
    else if (how === 'close') this.sock.end();
    else this.sock.write(quit);
    await waitFor(() => this.closed || undefined, 5000, 'client socket closed');
  }
}

export async function connectSocket(port: number): Promise<net.Socket> {
  const s = net.connect({ host: '127.0.0.1', port });
  await new Promise<void>((resolve, reject) => {
    s.once('connect', resolve);
    s.once('error', reject);
  });
  return s;
}

export async function connectLine(port: number): Promise<LineClient> {
  const s = await connectSocket(port);
  return new LineClient(s, s);
}

/** TLS to an implicit-TLS port behind a "load balancer": the PROXY v2 header (from `source`) and the ClientHello in one write. */
export async function implicitTlsViaLb(port: number, source: { address: string; port: number }): Promise<LineClient> {
  const raw = await connectSocket(port);
  const header = buildProxyHeader('v2', source, { address: '127.0.0.1', port });
  let first = true;
  const d = new Duplex({
    read() {
      raw.resume();
    },
    write(chunk: Buffer, _enc, cb) {
      raw.write(first ? Buffer.concat([header, chunk]) : chunk, cb);
      first = false;
    },
    final(cb) {
      raw.end();
      cb();
    },
    destroy(err, cb) {
      raw.destroy();
      cb(err);
    },
  });
  raw.on('data', (c: Buffer) => {
    if (!d.push(c)) raw.pause();
  });
  raw.on('end', () => d.push(null));
  const s = tls.connect({ socket: d as unknown as net.Socket, rejectUnauthorized: false });
  await new Promise<void>((resolve, reject) => {
    s.once('secureConnect', resolve);
    s.once('error', reject);
  });
  return new LineClient(raw, s);
}
