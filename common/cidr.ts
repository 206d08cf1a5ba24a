/**
 * Address lists for trust decisions (PROXY headers, master logins, XCLIENT): a list of
 * CIDRs or single addresses, checked with Node's BlockList. IPv4-mapped IPv6 addresses
 * (::ffff:10.0.0.1) are matched as the IPv4 address they carry.
 */
import { BlockList, isIP } from 'node:net';
import { ConfigError } from './errors.ts';

export function normalizeAddress(addr: string): string {
  const m = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(addr);
  return m ? m[1]! : addr;
}

export class AddressList {
  private readonly list = new BlockList();
  readonly entries: readonly string[];

  constructor(entries: readonly string[], key = 'addresses') {
    this.entries = entries;
    entries.forEach((entry, i) => {
      const [addr, bits] = entry.split('/');
      const family = isIP(addr ?? '');
      if (!addr || family === 0) throw new ConfigError(`${key}[${i}]`, `not an IP address or CIDR: ${JSON.stringify(entry)}`);
      const type = family === 6 ? 'ipv6' : 'ipv4';
      if (bits === undefined) {
        this.list.addAddress(addr, type);
        return;
      }
      const prefix = Number(bits);
      if (!Number.isInteger(prefix) || prefix < 0 || prefix > (family === 6 ? 128 : 32)) {
        throw new ConfigError(`${key}[${i}]`, `bad prefix length in ${JSON.stringify(entry)}`);
      }
      this.list.addSubnet(addr, prefix, type);
    });
  }

  has(address: string | undefined): boolean {
    if (!address) return false;
    const addr = normalizeAddress(address);
    const family = isIP(addr);
    if (family === 0) return false;
    return this.list.check(addr, family === 6 ? 'ipv6' : 'ipv4');
  }
}
