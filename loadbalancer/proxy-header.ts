/**
 * The PROXY protocol header the balancer writes first on every backend connection
 * (built with proxy-protocol-js): v2 binary (TCP4/TCP6) by default, v1 text for old backends.
 * Source = the client's address and port, destination = the listener address the client
 * reached. IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`, from a dual-stack listener) go out as
 * TCP4. Health checks send a v2 LOCAL header, which a proxy reads as "no client".
 */
import { isIPv4, isIPv6 } from 'node:net';
import {
  V1ProxyProtocol,
  V2ProxyProtocol,
  Command,
  TransportProtocol,
  IPv4ProxyAddress,
  IPv4Address,
  IPv6ProxyAddress,
  IPv6Address,
  UnspecProxyAddress,
  Peer,
  INETProtocol,
} from 'proxy-protocol-js';

export type ProxyVersion = 'v1' | 'v2' | 'none';

export interface Endpoint {
  address: string;
  port: number;
}

function unmap(a: string): string {
  return a.startsWith('::ffff:') && isIPv4(a.slice(7)) ? a.slice(7) : a;
}

/** The 4 bytes of a dotted-quad IPv4 address (already validated by isIPv4): parsed in place, no split. */
function v4bytes(a: string): [number, number, number, number] {
  const out: [number, number, number, number] = [0, 0, 0, 0];
  let i = 0;
  for (let k = 0; k < a.length; k++) {
    const c = a.charCodeAt(k);
    if (c === 46 /* . */) i++;
    else out[i] = out[i]! * 10 + (c - 48);
  }
  return out;
}

/** 16 bytes of an IPv6 address (also accepts IPv4, as a mapped address). */
export function v6bytes(a: string): number[] {
  if (isIPv4(a)) return [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, ...v4bytes(a)];
  let s = a;
  const zone = s.indexOf('%');
  if (zone >= 0) s = s.slice(0, zone);
  let tail: number[] = [];
  const lastColon = s.lastIndexOf(':');
  if (isIPv4(s.slice(lastColon + 1))) {
    tail = v4bytes(s.slice(lastColon + 1));
    s = s.slice(0, lastColon + 1) + '0:0';
  }
  const [head, rest] = s.includes('::') ? s.split('::') : [s, undefined];
  const hg = head ? head.split(':') : [];
  const rg = rest !== undefined && rest !== '' ? rest.split(':') : [];
  const fill = rest === undefined ? 0 : 8 - hg.length - rg.length;
  const groups = [...hg, ...Array(fill).fill('0'), ...rg].map((g) => parseInt(g, 16) || 0);
  const out: number[] = [];
  for (const g of groups) out.push((g >> 8) & 0xff, g & 0xff);
  if (tail.length) out.splice(12, 4, ...tail);
  return out;
}

/** The header bytes for one backend connection; empty for `none`. */
export function buildProxyHeader(version: ProxyVersion, source: Endpoint, destination: Endpoint): Buffer {
  if (version === 'none') return Buffer.alloc(0);
  const src = unmap(source.address);
  const dst = unmap(destination.address);
  const both4 = isIPv4(src) && isIPv4(dst);
  if (version === 'v1') {
    if (!(both4 || (isIPv6(src) || isIPv4(src)))) return Buffer.from('PROXY UNKNOWN\r\n');
    const p = new V1ProxyProtocol(
      both4 ? INETProtocol.TCP4 : INETProtocol.TCP6,
      new Peer(both4 ? src : isIPv4(src) ? `::ffff:${src}` : src, source.port),
      new Peer(both4 ? dst : isIPv4(dst) ? `::ffff:${dst}` : dst, destination.port),
    );
    return Buffer.from(p.build(), 'latin1');
  }
  const addr = both4
    ? new IPv4ProxyAddress(new IPv4Address(v4bytes(src)), source.port, new IPv4Address(v4bytes(dst)), destination.port)
    : new IPv6ProxyAddress(IPv6Address.createFrom(v6bytes(src)), source.port, IPv6Address.createFrom(v6bytes(dst)), destination.port);
  const p = new V2ProxyProtocol(Command.PROXY, TransportProtocol.STREAM, addr);
  return Buffer.from(p.build());
}

/** v2 LOCAL header (health checks: "no client behind this connection"). */
export function buildLocalHeader(): Buffer {
  return Buffer.from(new V2ProxyProtocol(Command.LOCAL, TransportProtocol.UNSPEC, new UnspecProxyAddress()).build());
}
