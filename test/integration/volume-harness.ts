/**
 * Two volume nodes as two real processes (`pairgate volume serve`) on loopback, driven through
 * their admin listeners. Not a test file itself.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { adminCall } from '../../common/admin-http.ts';
import type { VolumeStatus } from '../../pair-agent/volume/index.ts';
import { PAIRGATE_BIN, REPO_ROOT } from '../../bin/lab/supervisor.ts';
import { freePort, waitFor, waitForPort } from '../helpers/net.ts';
import { startProcess, type Managed } from '../helpers/proc.ts';

export const SECRET = 'volume-test-secret-0123456789';

export interface VolumeNode {
  name: 'a' | 'b';
  config: Record<string, unknown>;
  configFile: string;
  adminUrl: string;
  replicationPort: number;
  dataFile: string;
  proc: Managed | null;
  start(): Promise<void>;
  kill(signal?: NodeJS.Signals): void;
  stop(): Promise<void>;
  status(): Promise<VolumeStatus>;
  post(path: string, body?: unknown, timeoutMs?: number): Promise<{ status: number; body: unknown }>;
  digests(): Promise<string[]>;
  metrics(): Promise<string>;
}

/** A volume's status from its admin API at `url`, or null when it does not answer within 500 ms (a node down or starting). */
export async function volumeStatusAt(url: string): Promise<VolumeStatus | null> {
  try {
    return (await adminCall(url, 'GET', '/status', undefined, { timeoutMs: 500 })).body as VolumeStatus;
  } catch {
    return null;
  }
}

export async function volumePair(
  dir: string,
  opts: { sizeBytes?: number; protocol?: 'A' | 'B' | 'C'; afterSb0Pri?: string; afterSb1Pri?: string; resyncRateBytesPerSec?: number; fencing?: 'dont-care' | 'resource-and-stonith'; start?: Array<'a' | 'b'> } = {},
): Promise<{ a: VolumeNode; b: VolumeNode; stop(): Promise<void> }> {
  const ports = { a: await freePort(), b: await freePort() };
  const make = async (name: 'a' | 'b'): Promise<VolumeNode> => {
    const peer = name === 'a' ? 'b' : 'a';
    const adminPort = await freePort();
    const config = {
      name: 'testvol',
      dataFile: join(dir, `${name}.data`),
      metaFile: join(dir, `${name}.meta`),
      sizeBytes: opts.sizeBytes ?? 8 * 1024 * 1024,
      listen: `127.0.0.1:${ports[name]}`,
      peer: `127.0.0.1:${ports[peer]}`,
      secret: SECRET,
      protocol: opts.protocol ?? 'C',
      pingIntervalMs: 100,
      pingTimeoutMs: 500,
      reconnectMs: 100,
      ...(opts.afterSb0Pri ? { afterSb0Pri: opts.afterSb0Pri } : {}),
      ...(opts.afterSb1Pri ? { afterSb1Pri: opts.afterSb1Pri } : {}),
      ...(opts.resyncRateBytesPerSec ? { resyncRateBytesPerSec: opts.resyncRateBytesPerSec } : {}),
      ...(opts.fencing ? { fencing: opts.fencing } : {}),
      admin: { host: '127.0.0.1', port: adminPort },
    };
    const configFile = join(dir, `${name}.yaml`);
    writeFileSync(configFile, stringify(config));
    const adminUrl = `http://127.0.0.1:${adminPort}`;
    const node: VolumeNode = {
      name,
      config,
      configFile,
      adminUrl,
      replicationPort: ports[name],
      dataFile: config.dataFile,
      proc: null,
      async start() {
        node.proc = startProcess(`volume-${name}`, process.execPath, [PAIRGATE_BIN, 'volume', 'serve', '--config', configFile, '--log-level', 'warn'], { cwd: REPO_ROOT });
        await waitForPort('127.0.0.1', adminPort, 20_000, () => node.proc!.alive());
      },
      kill(signal = 'SIGKILL') {
        node.proc?.kill(signal);
      },
      async stop() {
        await node.proc?.stop(3000);
      },
      async status() {
        return (await adminCall(adminUrl, 'GET', '/status')).body as VolumeStatus;
      },
      post(path, body, timeoutMs = 20_000) {
        return adminCall(adminUrl, 'POST', path, body ?? {}, { timeoutMs });
      },
      async digests() {
        return ((await adminCall(adminUrl, 'GET', '/digest', undefined, { timeoutMs: 20_000 })).body as { blockDigests: string[] }).blockDigests;
      },
      async metrics() {
        return (await adminCall(adminUrl, 'GET', '/metrics')).body as string;
      },
    };
    return node;
  };
  const a = await make('a');
  const b = await make('b');
  // `start` picks the nodes started now (a node started later meets its peer then).
  const first = opts.start ?? ['a', 'b'];
  await Promise.all([a, b].filter((n) => first.includes(n.name)).map((n) => n.start()));
  return {
    a,
    b,
    async stop() {
      await Promise.all([a.stop(), b.stop()]);
    },
  };
}

/** Both nodes connected, nothing out of sync. */
export async function inSync(a: VolumeNode, b: VolumeNode, timeoutMs = 20_000): Promise<void> {
  await waitFor(
    async () => {
      const [sa, sb] = await Promise.all([a.status(), b.status()]);
      return sa.connection === 'Connected' && sb.connection === 'Connected' && sa.outOfSyncBytes === 0 && sb.outOfSyncBytes === 0 && sa.disk === 'UpToDate' && sb.disk === 'UpToDate';
    },
    timeoutMs,
    'both volume nodes connected and in sync',
    50,
  );
}

export function block(seed: number, size = 4096): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i += 4) b.writeUInt32LE((seed * 2654435761 + i * 40503) >>> 0, i);
  return b;
}
