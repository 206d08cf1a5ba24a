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
import { AddressSlots } from './address-slots.ts';
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

/**
 * Open connections of one listener, in total and per client address. A connection holds its
 * slots from accept (the total) and from the moment its client address is known (per address:
 * at accept, or after the PROXY header), through its PROXY header and TLS handshake, until its
 * session ends: connections still handshaking count against both limits.
 */
class Slots implements ConnectionSlots {
  open = 0;

  constructor(readonly addresses: AddressSlots) {}

  /** Gives back the total slot and, when given, the address's. */
  release(address: string | null): void {
    this.open--;
    if (address !== null) this.addresses.give(address);
  }
}

/** The slots a connection holds between accept and its session (which then gives them back at its end). */
class HeldSlots {
  private held = true;

  constructor(
    private readonly slots: Slots,
    public address: string | null,
  ) {}

  giveBack(): void {
    if (!this.held) return;
    this.held = false;
    this.slots.release(this.address);
  }

  handOver(): void {
    this.held = false;
  }
}

export async function startListener(ctx: ProxyContext, lc: ListenerConfig): Promise<Listener> {
  const name = lc.name ?? `${lc.protocol}-${lc.port}`;
  const log = ctx.log.child({ listener: name });
  const limits = ctx.config.limits;
  const slots = new Slots(new AddressSlots(limits.maxConnectionsPerIp));

  const reject = (socket: net.Socket, reason: string, text: string | null) => {
    ctx.metrics.rejected.inc({ protocol: lc.protocol, reason });
    if (text && !socket.destroyed) socket.end(rejectLine(lc.protocol, text));
    else socket.destroy();
    const t = setTimeout(() => socket.destroy(), 2000);
    t.unref();
  };

  /** Counts a connection against its address's limit; false when the address is at it. */
  const takeAddressSlot = (address: string): boolean => {
    if (slots.addresses.take(address) !== null) return true;
    log.warn({ client: address, open: slots.addresses.count(address) }, 'per-address connection limit reached');
    return false;
  };

  /** The session; from here on its end gives the slots back (ClientSession.finish). */
  const admit = (raw: net.Socket, socket: net.Socket, remote: ClientAddress, viaLb: boolean) => {
    const conn = new Accepted(socket, remote, raw, lc.tls === 'implicit', lc, viaLb, slots);
    const session: ClientSession = lc.protocol === 'imap' ? new ImapSession(ctx, conn) : new Pop3Session(ctx, conn);
    session.start();
  };

  /**
   * Connections from load balancers (PROXY header first) and on implicit-TLS ports: what takes
   * waiting. `held` is what this connection holds until its session takes it over: the total
   * slot and, once known, its address's; its `giveBack()` runs at most once.
   */
  const acceptSlow = async (raw: net.Socket, peer: string, viaLb: boolean, held: HeldSlots) => {
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
        held.giveBack();
        return reject(raw, 'proxy-header', null);
      }
      if (!takeAddressSlot(remote.address)) {
        held.giveBack();
        return reject(raw, 'max-per-ip', lc.tls === 'implicit' ? null : 'Too many connections from your address.');
      }
      held.address = remote.address;
    }
    if (lc.tls === 'implicit') {
      if (!ctx.tls) {
        held.giveBack();
        return reject(raw, 'no-tls', null);
      }
      try {
        const under = prefix.length ? (withPrefix(raw, prefix) as unknown as net.Socket) : raw;
        socket = await upgradeToTls(under, ctx.tls, ctx.config.timeouts.tlsHandshakeMs);
      } catch (err) {
        log.debug({ peer, err: (err as Error).message }, 'TLS handshake failed');
        ctx.metrics.rejected.inc({ protocol: lc.protocol, reason: 'tls-handshake' });
        held.giveBack();
        raw.destroy();
        return;
      }
    } else if (prefix.length) {
      raw.unshift(prefix);
    }
    held.handOver();
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
    // A direct client's address is known now: its slot is taken before any handshake.
    if (!viaLb && !takeAddressSlot(peer)) return reject(raw, 'max-per-ip', lc.tls === 'implicit' ? null : 'Too many connections from your address.');
    slots.open++;
    if (viaLb || lc.tls === 'implicit') {
      const held = new HeldSlots(slots, viaLb ? null : peer);
      acceptSlow(raw, peer, viaLb, held).catch((err) => {
        log.error({ err }, 'accepting a connection failed');
        held.giveBack();
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
