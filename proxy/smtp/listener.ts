/**
 * SMTP listeners (25, 587, 465): accept, read the PROXY v1/v2 header from load balancers
 * (required from them; proxy/proxy-protocol.ts decodes it), apply the connection limits
 * (total, per client address), run the TLS handshake on implicit-TLS ports, then hand the
 * socket and the client's real address to the front end (server.ts).
 */
import net from 'node:net';
import { Duplex } from 'node:stream';
import type { AddressInfo } from 'node:net';
import { normalizeAddress, type AddressList } from '../../common/cidr.ts';
import type { Logger } from '../../common/log.ts';
import { readProxyHeader } from '../proxy-protocol.ts';
import type { SmtpListenerConfig } from './config.ts';
import type { FrontEnd } from './server.ts';
import type { SmtpMetrics } from './metrics.ts';
import { upgradeToTls, type TlsStore } from '../tls.ts';
import { AddressSlots } from '../address-slots.ts';

export interface SmtpListener {
  name: string;
  config: SmtpListenerConfig;
  address: AddressInfo;
  close(): Promise<void>;
}

export interface ListenerDeps {
  frontEnd: FrontEnd;
  loadBalancers: AddressList;
  proxyHeaderTimeoutMs: number;
  tlsHandshakeTimeoutMs: number;
  tls: TlsStore | null;
  maxConnectionsPerIp: number;
  metrics: SmtpMetrics;
  log: Logger;
  stopping: () => boolean;
}

/** Replays bytes already read (after a PROXY header) before the socket's own stream; TLS needs them. */
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

export async function startSmtpListener(lc: SmtpListenerConfig, deps: ListenerDeps): Promise<SmtpListener> {
  const name = lc.name ?? `${lc.kind}-${lc.port}`;
  const log = deps.log.child({ listener: name });
  const addresses = new AddressSlots(deps.maxConnectionsPerIp);
  const implicit = lc.tls === 'implicit';

  const refuse = (socket: net.Socket, reason: string, line: string | null) => {
    deps.metrics.rejectedConnections.inc({ protocol: 'smtp', reason });
    deps.metrics.rejects.inc({ reason });
    if (line && !socket.destroyed) socket.end(line);
    else socket.destroy();
    setTimeout(() => socket.destroy(), 2000).unref();
  };

  const accept = async (raw: net.Socket) => {
    raw.setNoDelay(true);
    raw.on('error', () => undefined);
    const peer = normalizeAddress(raw.remoteAddress ?? '');
    if (deps.stopping()) return refuse(raw, 'stopping', implicit ? null : '421 4.3.2 Service shutting down\r\n');
    let client = { address: peer, port: raw.remotePort ?? 0 };
    let prefix: Buffer = Buffer.alloc(0);
    if (deps.loadBalancers.has(peer)) {
      try {
        const { header, rest } = await readProxyHeader(raw, deps.proxyHeaderTimeoutMs);
        if (header.source) client = { address: normalizeAddress(header.source.address), port: header.source.port };
        prefix = rest;
      } catch (err) {
        log.warn({ peer, err: (err as Error).message }, 'connection from a load balancer without a valid PROXY header: closed');
        return refuse(raw, 'proxy-header', null);
      }
    }
    // Counted from here, through the TLS handshake, until the session ends: a handshake in flight holds its slot.
    if (addresses.take(client.address) === null) {
      log.warn({ client: client.address, open: addresses.count(client.address) }, 'per-address connection limit reached');
      return refuse(raw, 'max-per-ip', implicit ? null : '421 4.7.0 Too many connections from your address\r\n');
    }
    let held = true;
    const giveBack = () => {
      if (!held) return;
      held = false;
      addresses.give(client.address);
    };
    let socket: net.Socket = raw;
    if (implicit) {
      if (!deps.tls) {
        giveBack();
        return refuse(raw, 'no-tls', null);
      }
      try {
        const under = prefix.length ? (withPrefix(raw, prefix) as unknown as net.Socket) : raw;
        socket = await upgradeToTls(under, deps.tls, deps.tlsHandshakeTimeoutMs);
      } catch (err) {
        log.debug({ client: client.address, err: (err as Error).message }, 'TLS handshake failed');
        deps.metrics.rejectedConnections.inc({ protocol: 'smtp', reason: 'tls-handshake' });
        giveBack();
        raw.destroy();
        return;
      }
    } else if (prefix.length) {
      raw.unshift(prefix);
    }
    deps.frontEnd.handle(socket, client, implicit, giveBack);
  };

  const server = net.createServer((socket) => {
    accept(socket).catch((err) => {
      log.error({ err }, 'accepting an SMTP connection failed');
      socket.destroy();
    });
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
  log.info({ host: address.address, port: address.port, kind: lc.kind, tls: lc.tls }, 'SMTP listening');
  return {
    name,
    config: lc,
    address,
    close: async () => {
      if (server.listening) server.close();
    },
  };
}
