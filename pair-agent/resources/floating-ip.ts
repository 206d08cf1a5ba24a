/**
 * The pair's floating address, in two modes:
 *  - `loopback`: an address in 127.0.0.0/8 that the pair's services bind on the active node only
 *    (labs and tests on one host). Start checks the address can be bound here; the listeners
 *    started after it (the health endpoint, the store) are what "holds" it, and the kernel
 *    refuses a second listener on the same address and port.
 *  - `iproute`: `ip addr add <addr>/<prefix> dev <iface>` and a gratuitous ARP (`arping -U`) so
 *    that neighbours update their caches at once; stop is `ip addr del`; monitor reads
 *    `ip -o addr show`. An optional network namespace runs the commands there (`ip -n`).
 */
import { execFile } from 'node:child_process';
import net from 'node:net';
import { z } from 'zod';
import { ConfigError, PairgateError } from '../../common/errors.ts';
import type { Logger } from '../../common/log.ts';
import type { MonitorResult, Resource } from '../resource.ts';

export const floatingIpSchema = z.discriminatedUnion('mode', [
  z.object({ mode: z.literal('loopback'), address: z.string().ip({ version: 'v4' }) }).strict(),
  z
    .object({
      mode: z.literal('iproute'),
      address: z.string().ip({ version: 'v4' }),
      prefix: z.number().int().min(1).max(32).default(24),
      interface: z.string().min(1).max(15),
      /** Run the ip/arping commands inside this network namespace (labs and tests). */
      netns: z.string().optional(),
      arping: z.boolean().default(true),
      arpCount: z.number().int().min(1).max(10).default(2),
    })
    .strict(),
]);

export type FloatingIpConfig = z.output<typeof floatingIpSchema>;

/** Refuses an address outside the mode's range (exit 2 at start, key named). */
export function checkFloatingIp(c: FloatingIpConfig, key = 'floatingIp.address'): void {
  const loop = c.address.startsWith('127.');
  if (c.mode === 'loopback' && !loop) throw new ConfigError(key, `${c.address} is not in 127.0.0.0/8, which loopback mode needs`);
  if (c.mode === 'iproute' && (loop || c.address === '0.0.0.0' || c.address.startsWith('255.'))) {
    throw new ConfigError(key, `${c.address} cannot be a floating address in iproute mode`);
  }
}

function run(cmd: string, args: string[], timeoutMs = 5000): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: timeoutMs }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as NodeJS.ErrnoException & { code?: unknown }).code === 'number' ? ((err as unknown as { code: number }).code) : 1) : 0;
      resolve({ code, stdout: String(stdout), stderr: String(stderr || (err && !stderr ? err.message : '')) });
    });
  });
}

let arpingFlavour: Promise<'iputils' | 'habets' | 'none'> | null = null;
function detectArping(): Promise<'iputils' | 'habets' | 'none'> {
  arpingFlavour ??= run('arping', ['--help'], 2000).then((r) => {
    const text = r.stdout + r.stderr;
    if (/Habets/i.test(text)) return 'habets';
    if (/iputils|-I <?device|-I\s+interface/i.test(text) || /Usage: arping/i.test(text)) return 'iputils';
    return 'none';
  });
  return arpingFlavour;
}

export class FloatingIpResource implements Resource {
  readonly name = 'floating-ip';
  private held = false;

  constructor(private readonly config: FloatingIpConfig, private readonly log: Logger) {
    checkFloatingIp(config);
  }

  get address(): string {
    return this.config.address;
  }

  private ipArgs(args: string[]): string[] {
    return this.config.mode === 'iproute' && this.config.netns ? ['-n', this.config.netns, ...args] : args;
  }

  async start(): Promise<void> {
    const c = this.config;
    if (c.mode === 'loopback') {
      await new Promise<void>((resolve, reject) => {
        const srv = net.createServer();
        srv.once('error', (err) => reject(new PairgateError('UNAVAILABLE', `cannot bind the floating address ${c.address}: ${err.message}`, true)));
        srv.listen(0, c.address, () => srv.close(() => resolve()));
      });
      this.held = true;
      return;
    }
    const cidr = `${c.address}/${c.prefix}`;
    const add = await run('ip', this.ipArgs(['addr', 'add', cidr, 'dev', c.interface]));
    if (add.code !== 0 && !/File exists/i.test(add.stderr)) throw new PairgateError('UNAVAILABLE', `ip addr add ${cidr} dev ${c.interface}: ${add.stderr.trim()}`, true);
    this.held = true;
    // announced in the background: arping may wait a second per count, the services need not
    if (c.arping) void this.gratuitousArp().catch((err: unknown) => this.log.warn({ err: (err as Error).message }, 'gratuitous ARP failed'));
  }

  /** Announces the address so neighbours update their ARP caches; a failure is logged, not fatal. */
  async gratuitousArp(): Promise<void> {
    if (this.config.mode !== 'iproute') return;
    const c = this.config;
    const flavour = await detectArping();
    if (flavour === 'none') {
      this.log.warn('arping not found: no gratuitous ARP sent (neighbours learn the move when their cache expires)');
      return;
    }
    const args =
      flavour === 'habets'
        ? ['-U', '-P', '-c', String(c.arpCount), '-i', c.interface, '-S', c.address, c.address]
        : ['-U', '-c', String(c.arpCount), '-I', c.interface, c.address];
    const full = c.netns ? ['ip', ['netns', 'exec', c.netns, 'arping', ...args]] as const : ['arping', args] as const;
    const r = await run(full[0], [...full[1]], 5000);
    // habets arping exits 1 when nobody answers, which is normal for unsolicited announcements
    if (r.code !== 0 && r.code !== 1) this.log.warn({ code: r.code, err: r.stderr.trim().slice(0, 200) }, 'gratuitous ARP failed');
  }

  async stop(): Promise<void> {
    const c = this.config;
    this.held = false;
    if (c.mode === 'loopback') return;
    const del = await run('ip', this.ipArgs(['addr', 'del', `${c.address}/${c.prefix}`, 'dev', c.interface]));
    if (del.code !== 0 && !/Cannot assign requested address|not found/i.test(del.stderr)) {
      this.held = true;
      throw new PairgateError('UNAVAILABLE', `ip addr del ${c.address}: ${del.stderr.trim()}`, true);
    }
  }

  async monitor(): Promise<MonitorResult> {
    const c = this.config;
    if (c.mode === 'loopback') return this.held ? 'running' : 'stopped';
    const r = await run('ip', this.ipArgs(['-o', '-4', 'addr', 'show', 'dev', c.interface]));
    if (r.code !== 0) return 'failed';
    const present = r.stdout.includes(` ${c.address}/`);
    if (this.held) return present ? 'running' : 'failed';
    return present ? 'failed' : 'stopped';
  }
}
