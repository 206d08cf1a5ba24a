/**
 * `pairgate status`: one table of the cluster. Pairs come from their health records in Redis
 * (`pairgate:pair:*:health`), or, when Redis is down or not configured, by polling each pair's
 * `/health` listed in a cluster file; proxies and load balancers by polling their admin
 * `/health`. The lab writes its cluster file to `lab/cluster.json`.
 */
import { existsSync, readFileSync } from 'node:fs';
import type { Command } from 'commander';
import Table from 'cli-table3';
import { RedisBus, KEY_PREFIX } from '../common/redis-bus.ts';
import { parseHealthRecord, type HealthRecord } from '../common/health.ts';
import { waitUntil } from './lab/wait.ts';

export interface ClusterFile {
  redis?: string;
  /** The pair-agents' admin token (the lab writes it here; production passes it by environment). */
  adminToken?: string;
  pairs?: Array<{ id: string; healthUrl: string; nodes?: Array<{ node: string; adminUrl: string }> }>;
  proxies?: Array<{ name: string; adminUrl: string }>;
  loadbalancers?: Array<{ name: string; adminUrl: string }>;
}

export interface ClusterStatus {
  source: 'redis' | 'polling';
  pairs: HealthRecord[];
  unreachablePairs: string[];
  proxies: Array<{ name: string; up: boolean; body: unknown }>;
  loadbalancers: Array<{ name: string; up: boolean; body: unknown }>;
}

async function getJson(url: string, timeoutMs = 1500): Promise<{ status: number; body: unknown } | null> {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(timeoutMs) });
    const text = await res.text();
    try {
      return { status: res.status, body: JSON.parse(text) };
    } catch {
      return { status: res.status, body: text };
    }
  } catch {
    return null;
  }
}

async function pairsFromRedis(url: string): Promise<HealthRecord[] | null> {
  const bus = new RedisBus({ url, connectTimeoutMs: 800 });
  try {
    const ready = await waitUntil(() => bus.connected, 1500);
    if (!ready) return null;
    const keyList = (await bus.scanKeys(`${KEY_PREFIX}pair:*:health`)).sort();
    const values = await bus.mget(keyList);
    return values.flatMap((v) => {
      const r = v ? parseHealthRecord(v) : null;
      return r ? [r] : [];
    });
  } catch {
    return null;
  } finally {
    await bus.close();
  }
}

export async function collectStatus(cluster: ClusterFile, redisUrl?: string): Promise<ClusterStatus> {
  const url = redisUrl ?? cluster.redis;
  let pairs = url ? await pairsFromRedis(url) : null;
  const source: ClusterStatus['source'] = pairs ? 'redis' : 'polling';
  const unreachablePairs: string[] = [];
  if (!pairs) {
    pairs = [];
    for (const p of cluster.pairs ?? []) {
      const r = await getJson(p.healthUrl);
      const rec = r && typeof r.body === 'object' ? parseHealthRecord(JSON.stringify(r.body)) : null;
      if (rec) pairs.push(rec);
      else unreachablePairs.push(p.id);
    }
  } else {
    const seen = new Set(pairs.map((p) => p.pair));
    for (const p of cluster.pairs ?? []) if (!seen.has(p.id)) unreachablePairs.push(p.id);
  }
  const poll = async (list: Array<{ name: string; adminUrl: string }> = []) =>
    Promise.all(
      list.map(async (x) => {
        const r = await getJson(new URL('/health', x.adminUrl).href);
        return { name: x.name, up: r?.status === 200, body: r?.body ?? null };
      }),
    );
  return { source, pairs, unreachablePairs, proxies: await poll(cluster.proxies), loadbalancers: await poll(cluster.loadbalancers) };
}

/** Colours only on a terminal, so piped output and logs stay plain. */
function table(head: string[]): Table.Table {
  return new Table(process.stdout.isTTY ? { head } : { head, style: { head: [], border: [] } });
}

function mib(n: number): string {
  return `${(n / 1048576).toFixed(1)} MiB`;
}

function sessionsOf(body: unknown): string {
  if (!body || typeof body !== 'object') return '-';
  const s = (body as Record<string, unknown>).sessions;
  if (typeof s === 'number') return String(s);
  if (s && typeof s === 'object') return Object.entries(s).map(([k, v]) => `${k}=${v}`).join(' ');
  return '-';
}

export function renderStatus(st: ClusterStatus): string {
  const pairs = table(['pair', 'state', 'primary', 'node a', 'node b', 'replication', 'out of sync', 'store used', 'messages', 'sessions']);
  for (const p of st.pairs) {
    const node = (id: string) => {
      const n = p.nodes[id];
      return n ? `${n.role}/${n.disk}/${n.heartbeat}` : '-';
    };
    pairs.push([
      p.pair,
      p.state,
      p.primary ?? '-',
      node('a'),
      node('b'),
      `${p.replication.connection} (${p.replication.protocol})`,
      mib(p.replication.outOfSyncBytes),
      `${mib(p.store.bytesUsed)} / ${mib(p.store.bytesTotal)}`,
      String(p.store.messages),
      `imap=${p.sessions.imap} pop3=${p.sessions.pop3} lmtp=${p.sessions.lmtp}`,
    ]);
  }
  for (const id of st.unreachablePairs) pairs.push([id, 'down (no record)', '-', '-', '-', '-', '-', '-', '-', '-']);
  const lines = [`pairs (from ${st.source}):`, pairs.toString()];
  if (st.proxies.length) {
    const t = table(['proxy', 'up', 'sessions']);
    for (const p of st.proxies) t.push([p.name, p.up ? 'yes' : 'NO', sessionsOf(p.body)]);
    lines.push('proxies:', t.toString());
  }
  if (st.loadbalancers.length) {
    const t = table(['load balancer', 'up', 'backends']);
    for (const lb of st.loadbalancers) {
      const b = lb.body && typeof lb.body === 'object' ? (lb.body as Record<string, unknown>).backends : undefined;
      const text = Array.isArray(b)
        ? b.map((x: Record<string, unknown>) => `${x.name ?? x.address ?? '?'}:${x.state ?? (x.up ? 'up' : 'down')}`).join(' ')
        : '-';
      t.push([lb.name, lb.up ? 'yes' : 'NO', text]);
    }
    lines.push('load balancers:', t.toString());
  }
  return lines.join('\n');
}

export function readClusterFile(file: string | undefined): ClusterFile {
  const path = file ?? 'lab/cluster.json';
  if (!existsSync(path)) return {};
  return JSON.parse(readFileSync(path, 'utf8')) as ClusterFile;
}

export function register(program: Command): void {
  program
    .command('status')
    .description('one table of the cluster: pairs, replication, store usage, sessions, proxies, balancers')
    .option('--redis <url>', 'Redis with the pairs’ health records (default: the cluster file’s)')
    .option('--cluster <file>', 'cluster file listing health and admin URLs (default: lab/cluster.json)')
    .option('--json', 'print JSON instead of a table')
    .action(async (opts: { redis?: string; cluster?: string; json?: boolean }) => {
      const st = await collectStatus(readClusterFile(opts.cluster), opts.redis);
      process.stdout.write(opts.json ? `${JSON.stringify(st, null, 2)}\n` : `${renderStatus(st)}\n`);
    });
}
