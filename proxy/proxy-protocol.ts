/**
 * The PROXY protocol (v1 text, v2 binary) on the proxy's listeners, decoded with
 * proxy-protocol-js. Framing (how many bytes the header takes) is done here, since the
 * library parses a complete header only; bytes the client sent after the header are handed
 * back so the session sees them.
 *
 * Trust: a header is accepted only from the configured load-balancer addresses, and required
 * from them; a connection from anywhere else that starts with a header is refused (the
 * caller decides, `readProxyHeader` only reads and decodes).
 */
import { isIP, type Socket } from 'node:net';
import { V1ProxyProtocol, V2ProxyProtocol, Command, IPv4ProxyAddress, IPv6ProxyAddress } from 'proxy-protocol-js';
import { ProtocolError, TimeoutError } from '../common/errors.ts';

export const V2_SIGNATURE = Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a]);
const V1_MAX = 107;
/** v2 headers may carry TLVs; more than this is refused rather than buffered. */
const V2_MAX = 16 + 2048;

export interface ProxiedAddress {
  /** The client's address and port as the load balancer saw them; null for LOCAL/UNKNOWN (health checks). */
  source: { address: string; port: number } | null;
  version: 1 | 2;
}

export interface HeaderResult {
  header: ProxiedAddress;
  /** Bytes after the header (the start of the client's own stream). */
  rest: Buffer;
}

/** Whether a buffer's first bytes could be a PROXY header (for refusing them from untrusted peers). */
export function looksLikeProxyHeader(buf: Buffer): boolean {
  if (buf.length === 0) return false;
  // Most first bytes can start neither signature (v2: 0x0D, v1: 'P'): no slices made for them.
  if (buf[0] !== V2_SIGNATURE[0] && buf[0] !== V1_PREFIX[0]) return false;
  const n = Math.min(buf.length, V2_SIGNATURE.length);
  if (buf.subarray(0, n).equals(V2_SIGNATURE.subarray(0, n))) return true;
  const m = Math.min(buf.length, V1_PREFIX.length);
  return buf.subarray(0, m).equals(V1_PREFIX.subarray(0, m));
}

const V1_PREFIX = Buffer.from('PROXY ');

function ipv6ToString(bytes: readonly number[]): string {
  const groups: string[] = [];
  for (let i = 0; i < 16; i += 2) groups.push((((bytes[i] ?? 0) << 8) | (bytes[i + 1] ?? 0)).toString(16));
  // Compressed form so that it matches what Node reports for the same address.
  const full = groups.join(':');
  let best = { start: -1, len: 0 };
  for (let i = 0; i < 8; ) {
    if (groups[i] !== '0') {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === '0') j++;
    if (j - i > best.len && j - i > 1) best = { start: i, len: j - i };
    i = j;
  }
  if (best.start < 0) return full;
  const head = groups.slice(0, best.start).join(':');
  const tail = groups.slice(best.start + best.len).join(':');
  return `${head}::${tail}`;
}

/**
 * Decodes one complete header from `buf`. Returns null when more bytes are needed;
 * throws ProtocolError when the bytes cannot be a valid header.
 */
export function decodeProxyHeader(buf: Buffer): { header: ProxiedAddress; length: number } | null {
  if (buf.length === 0) return null;
  if (buf[0] === 0x0d) {
    if (buf.length < 16) {
      if (!V2_SIGNATURE.subarray(0, Math.min(buf.length, 12)).equals(buf.subarray(0, Math.min(buf.length, 12)))) throw new ProtocolError('malformed PROXY v2 signature');
      return null;
    }
    if (!buf.subarray(0, 12).equals(V2_SIGNATURE)) throw new ProtocolError('malformed PROXY v2 signature');
    if ((buf[12]! & 0xf0) !== 0x20) throw new ProtocolError('unsupported PROXY v2 version');
    const length = 16 + buf.readUInt16BE(14);
    if (length > V2_MAX) throw new ProtocolError(`PROXY v2 header too long (${length} bytes)`);
    if (buf.length < length) return null;
    let parsed: V2ProxyProtocol;
    try {
      parsed = V2ProxyProtocol.parse(new Uint8Array(buf.subarray(0, length)));
    } catch (err) {
      throw new ProtocolError(`malformed PROXY v2 header: ${(err as Error).message}`);
    }
    if (parsed.command === Command.LOCAL) return { header: { source: null, version: 2 }, length };
    const a = parsed.proxyAddress;
    if (a instanceof IPv4ProxyAddress) {
      return { header: { source: { address: a.sourceAddress.address.join('.'), port: a.sourcePort }, version: 2 }, length };
    }
    if (a instanceof IPv6ProxyAddress) {
      return { header: { source: { address: ipv6ToString(a.sourceAddress.address), port: a.sourcePort }, version: 2 }, length };
    }
    // UNSPEC / UNIX: no usable client address.
    return { header: { source: null, version: 2 }, length };
  }
  if (buf[0] === 0x50) {
    const lf = buf.indexOf(0x0a);
    if (lf < 0) {
      if (buf.length >= V1_MAX) throw new ProtocolError('PROXY v1 header too long');
      if (!Buffer.from('PROXY ').subarray(0, Math.min(buf.length, 6)).equals(buf.subarray(0, Math.min(buf.length, 6)))) throw new ProtocolError('malformed PROXY v1 header');
      return null;
    }
    const length = lf + 1;
    if (length > V1_MAX || buf[lf - 1] !== 0x0d) throw new ProtocolError('malformed PROXY v1 header');
    const line = buf.subarray(0, length).toString('latin1');
    if (/^PROXY UNKNOWN[^\r\n]*\r\n$/.test(line)) return { header: { source: null, version: 1 }, length };
    let parsed: V1ProxyProtocol;
    try {
      parsed = V1ProxyProtocol.parse(line);
    } catch {
      throw new ProtocolError('malformed PROXY v1 header');
    }
    const src = parsed.source;
    const fam = isIP(src.ipAddress);
    if (fam === 0 || isIP(parsed.destination.ipAddress) === 0 || (parsed.inetProtocol === 'TCP4') !== (fam === 4)) throw new ProtocolError('malformed PROXY v1 addresses');
    if (!(src.port > 0 && src.port < 65536)) throw new ProtocolError('malformed PROXY v1 port');
    return { header: { source: { address: src.ipAddress, port: src.port }, version: 1 }, length };
  }
  throw new ProtocolError('PROXY header required');
}

/** Reads a PROXY header from a fresh socket (nothing else has read from it), bounded in time. */
export function readProxyHeader(socket: Socket, timeoutMs: number): Promise<HeaderResult> {
  return new Promise((resolve, reject) => {
    let buf: Buffer = Buffer.alloc(0);
    const finish = (err: Error | null, result?: HeaderResult) => {
      clearTimeout(timer);
      socket.off('data', onData);
      socket.off('close', onClose);
      socket.off('error', onClose);
      if (err) reject(err);
      else resolve(result!);
    };
    const onData = (chunk: Buffer) => {
      buf = buf.length ? Buffer.concat([buf, chunk]) : chunk;
      try {
        const d = decodeProxyHeader(buf);
        if (!d) return;
        socket.pause();
        finish(null, { header: d.header, rest: buf.subarray(d.length) });
      } catch (err) {
        finish(err as Error);
      }
    };
    const onClose = () => finish(new ProtocolError('connection closed before the PROXY header'));
    const timer = setTimeout(() => finish(new TimeoutError(`no PROXY header within ${timeoutMs} ms`)), timeoutMs);
    socket.on('data', onData);
    socket.once('close', onClose);
    socket.once('error', onClose);
  });
}
