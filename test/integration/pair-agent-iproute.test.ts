/**
 * The `iproute` floating IP in network namespaces the test creates: nodes A and B and a client C
 * joined by a bridge (veth links). The address moves from A to B with `ip addr del/add` plus a
 * gratuitous ARP, and the client then reaches B (its ARP entry names B's MAC). Then two real
 * pair-agents, one in each node namespace, heartbeat over the bridge and fail over on SIGKILL. Needs
 * CAP_NET_ADMIN (runs in CI as root); skipped with a message otherwise.
 */
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { startProcess, tempDir, type Managed } from '../helpers/proc.ts';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/log.ts';
import { FloatingIpResource } from '../../pair-agent/resources/floating-ip.ts';
import { sleep, waitFor } from '../helpers/net.ts';

const tag = `pg${process.pid % 100000}`;
const ns = { a: `${tag}-a`, b: `${tag}-b`, c: `${tag}-c` };
const FLOAT = '10.231.0.100';

function sh(args: string[]): string {
  return execFileSync('ip', args, { encoding: 'utf8', timeout: 5000, stdio: ['ignore', 'pipe', 'pipe'] });
}

function canNetAdmin(): string | null {
  try {
    sh(['netns', 'add', `${tag}-probe`]);
    sh(['netns', 'del', `${tag}-probe`]);
    return null;
  } catch (err) {
    return (err as Error).message.split('\n')[0] ?? 'ip netns add failed';
  }
}

const skipReason = canNetAdmin();
if (skipReason) console.warn(`pair-agent iproute test skipped: needs CAP_NET_ADMIN to create network namespaces (${skipReason})`);

function mac(netns: string, dev: string): string {
  return /link\/ether ([0-9a-f:]+)/.exec(sh(['-n', netns, 'link', 'show', dev]))![1]!;
}

/** A TCP connect from the client to a closed port: "connection refused" proves a host answered at the address. */
function clientReaches(): boolean {
  try {
    execFileSync('ip', ['netns', 'exec', ns.c, 'timeout', '2', 'bash', '-c', `exec 3<>/dev/tcp/${FLOAT}/9`], { stdio: ['ignore', 'ignore', 'pipe'], timeout: 4000 });
    return true;
  } catch (err) {
    return /Connection refused/i.test(String((err as { stderr?: Buffer }).stderr ?? ''));
  }
}

/** A plain HTTP/1.0 GET from the client namespace (bash /dev/tcp); '' when nothing answers. */
function httpFromClient(host: string, port: number, path: string): string {
  try {
    return execFileSync('ip', ['netns', 'exec', ns.c, 'timeout', '0.5', 'bash', '-c', `exec 3<>/dev/tcp/${host}/${port} && printf 'GET ${path} HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3`], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'ignore'],
      timeout: 4000,
    });
  } catch {
    return '';
  }
}

function clientSees(): string | null {
  const line = sh(['-n', ns.c, 'neigh', 'show', FLOAT]);
  return /lladdr ([0-9a-f:]+)/.exec(line)?.[1] ?? null;
}

describe.skipIf(skipReason !== null)('pair-agent floating IP, iproute mode, in network namespaces', () => {
  beforeAll(() => {
    for (const n of Object.values(ns)) sh(['netns', 'add', n]);
    sh(['-n', ns.c, 'link', 'add', 'br0', 'type', 'bridge']);
    sh(['-n', ns.c, 'addr', 'add', '10.231.0.3/24', 'dev', 'br0']);
    sh(['-n', ns.c, 'link', 'set', 'br0', 'up']);
    for (const [node, ip] of [['a', '10.231.0.1/24'], ['b', '10.231.0.2/24']] as const) {
      const netns = ns[node];
      sh(['link', 'add', `${tag}${node}`, 'type', 'veth', 'peer', 'name', `${tag}${node}br`]);
      sh(['link', 'set', `${tag}${node}`, 'netns', netns, 'name', 'eth0']);
      sh(['link', 'set', `${tag}${node}br`, 'netns', ns.c]);
      sh(['-n', ns.c, 'link', 'set', `${tag}${node}br`, 'master', 'br0', 'up']);
      sh(['-n', netns, 'addr', 'add', ip, 'dev', 'eth0']);
      sh(['-n', netns, 'link', 'set', 'eth0', 'up']);
      sh(['-n', netns, 'link', 'set', 'lo', 'up']);
    }
  });
  afterAll(() => {
    for (const n of Object.values(ns)) {
      try {
        sh(['netns', 'del', n]);
      } catch {
        // already gone
      }
    }
  });

  it('moves the address from node A to node B; the client in a third namespace reaches B', async () => {
    const res = (node: 'a' | 'b') =>
      new FloatingIpResource({ mode: 'iproute', address: FLOAT, prefix: 24, interface: 'eth0', netns: ns[node], arping: true, arpCount: 1 }, silentLogger);
    const ipA = res('a');
    const ipB = res('b');
    expect(await ipA.monitor()).toBe('stopped');
    await ipA.start();
    expect(await ipA.monitor()).toBe('running');
    await waitFor(() => clientReaches(), 10_000, 'client reaches the floating address on A');
    expect(clientSees()).toBe(mac(ns.a, 'eth0'));
    await sleep(1100); // the kernel ignores ARP updates within locktime (1 s) of the last one
    await ipA.stop();
    expect(await ipA.monitor()).toBe('stopped');
    expect(sh(['-n', ns.a, '-o', 'addr', 'show', 'dev', 'eth0'])).not.toContain(FLOAT);
    await ipB.start(); // ip addr add + gratuitous ARP
    expect(await ipB.monitor()).toBe('running');
    // the gratuitous ARP updated the client's cache: it now names B, before any new ARP exchange
    await waitFor(() => clientSees() === mac(ns.b, 'eth0'), 5000, 'client ARP entry moved to B');
    expect(clientReaches()).toBe(true);
    await ipB.stop();
    await ipB.stop(); // idempotent
  });

  it('two pair-agents in namespaces A and B: SIGKILL of A, B fences, adds the address and the client reaches it', async () => {
    const dir = tempDir('pairgate-netns-');
    const procs: Managed[] = [];
    try {
      const ip = { a: '10.231.0.1', b: '10.231.0.2' };
      const start = (node: 'a' | 'b') => {
        const peer = node === 'a' ? 'b' : 'a';
        const file = join(dir.path, `${node}.yaml`);
        writeFileSync(
          file,
          stringify({
            pair: 'pair-ns',
            node,
            preferred: 'a',
            admin: { listen: `${ip[node]}:7100` },
            heartbeat: { key: 'netns-heartbeat-key-0123', listen: `${ip[node]}:7001`, peers: [`${ip[peer]}:7001`], keepaliveMs: 100, warntimeMs: 400, deadtimeMs: 1200, initdeadMs: 4000 },
            fencing: { device: 'process', pidFile: join(dir.path, `${peer}.pid`), delayMs: node === 'a' ? 0 : 400 },
            pidFile: join(dir.path, `${node}.pid`),
            floatingIp: { mode: 'iproute', address: FLOAT, prefix: 24, interface: 'eth0', arpCount: 1 },
            healthPort: 9025,
          }),
        );
        const repo = join(import.meta.dirname, '..', '..');
        const p = startProcess(`pair-agent-${node}`, 'ip', ['netns', 'exec', ns[node], process.execPath, join(repo, 'bin', 'pairgate.mjs'), 'pair-agent', '--config', file], { cwd: repo });
        procs.push(p);
        return p;
      };
      const a = start('a');
      start('b');
      const health = () => httpFromClient(FLOAT, 9025, '/health');
      await waitFor(() => /"primary":"a"/.test(health()), 30_000, 'a serving health on the floating address (seen from the client namespace)').catch((err) => {
        throw new Error(`${(err as Error).message}\n${procs.map((p) => p.output().slice(-2000)).join('\n---\n')}`);
      });
      expect(sh(['-n', ns.a, '-o', 'addr', 'show', 'dev', 'eth0'])).toContain(FLOAT);
      expect(clientSees()).toBe(mac(ns.a, 'eth0'));
      await sleep(1100); // past the client's ARP locktime
      // node A loses power: its process dies and its addresses go with it
      a.kill('SIGKILL');
      await a.exited;
      sh(['-n', ns.a, 'addr', 'flush', 'dev', 'eth0', 'to', `${FLOAT}/32`]);
      const t0 = Date.now();
      await waitFor(() => /"primary":"b"/.test(health()), 15_000, 'b serving on the floating address');
      console.log(`netns failover: client reached node B ${Date.now() - t0} ms after node A went down`);
      expect(sh(['-n', ns.b, '-o', 'addr', 'show', 'dev', 'eth0'])).toContain(FLOAT);
      expect(clientSees()).toBe(mac(ns.b, 'eth0'));
    } finally {
      await Promise.all(procs.map((p) => p.stop(3000)));
      for (const n of ['a', 'b'] as const) {
        try {
          sh(['-n', ns[n], 'addr', 'flush', 'dev', 'eth0', 'to', `${FLOAT}/32`]);
        } catch {
          // namespace gone
        }
      }
      dir.cleanup();
    }
  });
});
