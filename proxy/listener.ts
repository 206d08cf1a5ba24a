/**
 * One client-facing listener (IMAP or POP3): accepts, reads the PROXY header from load
 * balancers (required from them), runs the TLS handshake on implicit-TLS ports, applies the
 * connection limits (total and per client address), then hands the connection to a session.
 */
import net from 'node:net';
import { Duplex } from 'node:stream';
import type { AddressInfo } from 'node:net';
import type { ListenerConfig } from './config.ts';
import { inList, type ProxyContext } from './context.ts';
import { readProxyHeader } from './proxy-protocol.ts';
import { upgradeToTls } from './tls.ts';
import { normalizeAddress } from '../common/cidr.ts';
import type { AcceptedConnection, ClientSession, ConnectionSlots } from './session.ts';
import type { ClientAddress } from './backend.ts';
import { ImapSession } from './imap.ts';
import { Pop3Session } from './pop3.ts';

export interface Listener {
  name: string;
  config: ListenerConfig;
  address: AddressInfo;
  /** Stops accepting (open sessions go on; the stop closes them). */
  close(): Promise<void>;
}

/**
 * A socket whose first bytes were already read (after a PROXY header) cannot be handed to
 * tls.TLSSocket directly: TLS reads from the native handle and would miss them. This duplex
 * replays them first, then forwards the socket's stream both ways with backpressure.
 */
function withPrefix(socket: net.Socket, prefix: Buffer): Duplex {
  const d = new Duplex({
    read() {
      socket.resume();
    },
    write(chunk, _enc, cb) {
      socket.write(chunk, cb);
    },
    final(cb) {
      socket.end();
      cb();
    },
    destroy(err, cb) {
      socket.destroy();
      cb(err);
    },
  });
  d.push(prefix);
  socket.on('data', (chunk: Buffer) => {
    if (!d.push(chunk)) socket.pause();
  });
  socket.on('end', () => d.push(null));
  socket.on('error', (err) => d.destroy(err));
  socket.on('close', () => d.destroy());
  return d;
}

const ignoreError = (): void => undefined;

function rejectLine(protocol: ListenerConfig['protocol'], text: string): string {
  return protocol === 'imap' ? `* BYE [UNAVAILABLE] ${text}\r\n` : `-ERR [SYS/TEMP] ${text}\r\n`;
}

/** A connection's local address, asked of the kernel (getsockname) only if something reads it. */
class Accepted implements AcceptedConnection {
  constructor(
    readonly socket: net.Socket,
    readonly remote: ClientAddress,
    private readonly raw: net.Socket,
    readonly secure: boolean,
    readonly listener: ListenerConfig,
    readonly viaLb: boolean,
    readonly slots: ConnectionSlots,
  ) {}

  get local(): ClientAddress {
    return { address: normalizeAddress(this.raw.localAddress ?? ''), port: this.raw.localPort ?? 0 };
  }
}

/** Open connections of one listener, in total and per client address. */
class Slots implements ConnectionSlots {
  readonly perIp = new Map<string, number>();
  open = 0;

  release(address: string): void {
    this.open--;
    const left = (this.perIp.get(address) ?? 1) - 1;
    if (left <= 0) this.perIp.delete(address);
    else this.perIp.set(address, left);
  }
}

export async function startListener(ctx: ProxyContext, lc: ListenerConfig): Promise<Listener> {
  const name = lc.name ?? `${lc.protocol}-${lc.port}`;
  const log = ctx.log.child({ listener: name });
  const slots = new Slots();
  const limits = ctx.config.limits;

  const reject = (socket: net.Socket, reason: string, text: string | null) => {
    ctx.metrics.rejected.inc({ protocol: lc.protocol, reason });
    if (text && !socket.destroyed) socket.end(rejectLine(lc.protocol, text));
    else socket.destroy();
    const t = setTimeout(() => socket.destroy(), 2000);
    t.unref();
  };

  /** The per-address limit, then the session. */
  const admit = (raw: net.Socket, socket: net.Socket, remote: ClientAddress, viaLb: boolean) => {
    const n = slots.perIp.get(remote.address) ?? 0;
    if (limits.maxConnectionsPerIp > 0 && n >= limits.maxConnectionsPerIp) {
      log.warn({ client: remote.address, open: n }, 'per-address connection limit reached');
      return reject(socket, 'max-per-ip', 'Too many connections from your address.');
    }
    slots.perIp.set(remote.address, n + 1);
    slots.open++;
    const conn = new Accepted(socket, remote, raw, lc.tls === 'implicit', lc, viaLb, slots);
    const session: ClientSession = lc.protocol === 'imap' ? new ImapSession(ctx, conn) : new Pop3Session(ctx, conn);
    session.start();
  };

  /** Connections from load balancers (PROXY header first) and on implicit-TLS ports: what takes waiting. */
  const acceptSlow = async (raw: net.Socket, peer: string, viaLb: boolean) => {
    let remote: ClientAddress = { address: peer, port: raw.remotePort ?? 0 };
    let socket: net.Socket = raw;
    let prefix: Buffer = Buffer.alloc(0);
    if (viaLb) {
      try {
        const { header, rest } = await readProxyHeader(raw, ctx.config.timeouts.proxyHeaderMs);
        if (header.source) remote = { address: normalizeAddress(header.source.address), port: header.source.port };
        prefix = rest;
      } catch (err) {
        log.warn({ peer, err: (err as Error).message }, 'connection from a load balancer without a valid PROXY header: closed');
        return reject(raw, 'proxy-header', null);
      }
    }
    if (lc.tls === 'implicit') {
      if (!ctx.tls) return reject(raw, 'no-tls', null);
      try {
        const under = prefix.length ? (withPrefix(raw, prefix) as unknown as net.Socket) : raw;
        socket = await upgradeToTls(under, ctx.tls, ctx.config.timeouts.tlsHandshakeMs);
      } catch (err) {
        log.debug({ peer, err: (err as Error).message }, 'TLS handshake failed');
        ctx.metrics.rejected.inc({ protocol: lc.protocol, reason: 'tls-handshake' });
        raw.destroy();
        return;
      }
    } else if (prefix.length) {
      raw.unshift(prefix);
    }
    admit(raw, socket, remote, viaLb);
  };

  const accept = (raw: net.Socket) => {
    raw.setNoDelay(true);
    raw.on('error', ignoreError);
    const peer = normalizeAddress(raw.remoteAddress ?? '');
    if (ctx.stopping) return reject(raw, 'stopping', lc.tls === 'implicit' ? null : 'Server shutting down.');
    if (limits.maxConnections > 0 && slots.open >= limits.maxConnections) {
      log.warn({ open: slots.open }, 'connection limit reached');
      return reject(raw, 'max-connections', lc.tls === 'implicit' ? null : 'Too many connections.');
    }
    const viaLb = inList(ctx.loadBalancers, peer);
    if (viaLb || lc.tls === 'implicit') {
      acceptSlow(raw, peer, viaLb).catch((err) => {
        log.error({ err }, 'accepting a connection failed');
        raw.destroy();
      });
      return;
    }
    // Plain connection from a client: no wait before the session starts.
    admit(raw, raw, { address: peer, port: raw.remotePort ?? 0 }, false);
  };

  const server = net.createServer({ pauseOnConnect: false }, (socket) => {
    try {
      accept(socket);
    } catch (err) {
      log.error({ err }, 'accepting a connection failed');
      socket.destroy();
    }
  });
  server.on('error', (err) => log.error({ err: err.message }, 'listener error'));
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(lc.port, lc.host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const address = server.address() as AddressInfo;
  log.info({ host: address.address, port: address.port, tls: lc.tls }, 'listening');
  return {
    name,
    config: lc,
    address,
    // Stops listening at once; net.Server's own callback would wait for every open session.
    close: async () => {
      if (server.listening) server.close();
    },
  };
}
