/**
 * The replicated volume as a pair resource: start = promote (primary), stop = demote
 * (secondary), monitor = the volume still primary with its disk attached. Its disk state goes
 * into the heartbeat view (so a stale node never takes over from an UpToDate one) and its
 * replication state into the health record. Written against the exported API of
 * pair-agent/volume/index.ts (volumeConfigSchema, openReplicatedVolume).
 */
import type { ZodTypeAny } from 'zod';
import { validateConfig } from '../../common/config.ts';
import { ConfigError } from '../../common/errors.ts';
import type { Logger } from '../../common/log.ts';
import type { MetricsRegistry } from '../../common/metrics.ts';
import type { MonitorResult, Resource } from '../resource.ts';
import type { OptionalResources } from './optional.ts';

/** The part of ReplicatedVolume the agent uses. */
export interface VolumeLike {
  promote(opts?: { force?: boolean }): Promise<unknown>;
  demote(): Promise<unknown>;
  status(): unknown;
  close(): Promise<unknown>;
  on?(event: string, listener: (...args: unknown[]) => void): unknown;
  peerSettled?(how: 'outdated' | 'fenced'): unknown;
  failHeldWrites?(why: string): unknown;
  outdate?(): unknown;
}

/** Volume events after which the node's view (disk state, writes held for the peer) and the health record change. */
export const VOLUME_EVENTS = ['role', 'connection', 'disk', 'sync', 'fence-peer'] as const;

function field(obj: unknown, ...names: string[]): unknown {
  for (const n of names) {
    const v = (obj as Record<string, unknown> | null)?.[n];
    if (v !== undefined) return v;
  }
  return undefined;
}

export function volumeView(status: unknown): { role: string; disk: string; connection: string; protocol: string; outOfSyncBytes: number } {
  const str = (v: unknown, d: string) => (typeof v === 'string' ? v : d);
  const num = (v: unknown) => (typeof v === 'number' ? v : 0);
  return {
    role: str(field(status, 'role'), 'unknown'),
    disk: str(field(status, 'disk', 'diskState'), 'unknown'),
    connection: str(field(status, 'connection', 'connectionState'), 'unknown'),
    protocol: str(field(status, 'protocol'), 'C'),
    outOfSyncBytes: num(field(status, 'outOfSyncBytes')),
  };
}

export class VolumeResource implements Resource {
  readonly name = 'volume';
  constructor(readonly volume: VolumeLike) {}

  async start(): Promise<void> {
    if (volumeView(this.volume.status()).role === 'primary') return;
    await this.volume.promote();
  }

  async stop(): Promise<void> {
    if (volumeView(this.volume.status()).role !== 'primary') return;
    await this.volume.demote();
  }

  async monitor(): Promise<MonitorResult> {
    const v = volumeView(this.volume.status());
    if (v.role !== 'primary') return 'stopped';
    return v.disk === 'UpToDate' ? 'running' : 'failed';
  }
}

export async function volumeResource(
  mod: Record<string, unknown>,
  raw: Record<string, unknown>,
  deps: { log: Logger; registry: MetricsRegistry; onChange?: (why: string) => void },
): Promise<OptionalResources> {
  const schema = mod.volumeConfigSchema as ZodTypeAny | undefined;
  const open = mod.openReplicatedVolume as ((c: unknown, d: { log: Logger; registry: MetricsRegistry }) => Promise<VolumeLike>) | undefined;
  if (!schema || typeof open !== 'function') throw new ConfigError('volume', 'pair-agent/volume/index.ts does not export volumeConfigSchema and openReplicatedVolume');
  let cfg: unknown;
  try {
    // Under the agent, a primary that loses its peer holds writes until the peer is outdated or
    // fenced (the agent does both), as DRBD with fencing resource-and-stonith: otherwise writes
    // acknowledged alone are missing on a peer that is promoted after this node dies.
    cfg = validateConfig(schema, { fencing: 'resource-and-stonith', ...raw }, 'volume');
  } catch (err) {
    const e = err as ConfigError;
    throw new ConfigError(`volume.${e.key ?? ''}`.replace(/\.$/, ''), e.message.replace(/^[^:]*: /, ''));
  }
  const volume = await open(cfg, { log: deps.log.child({ part: 'volume' }), registry: deps.registry });
  const resource = new VolumeResource(volume);
  if (typeof volume.on === 'function') for (const ev of VOLUME_EVENTS) volume.on(ev, () => deps.onChange?.(`volume ${ev}`));
  return {
    volume: resource,
    volumeDisk: () => volumeView(volume.status()).disk,
    volumeRole: () => volumeView(volume.status()).role,
    volumeUuids: () => {
      const u = field(volume.status(), 'uuids') as { current?: unknown; bitmap?: unknown; history?: unknown } | undefined;
      const all = [u?.current, u?.bitmap, ...(Array.isArray(u?.history) ? u.history : [])];
      return all.filter((x): x is string => typeof x === 'string' && !/^0+$/.test(x));
    },
    volumeFenceSince: () => {
      const since = field(field(volume.status(), 'peerFence'), 'since');
      return typeof since === 'number' ? since : null;
    },
    volumeFailHeld: (why) => volume.failHeldWrites?.(why),
    volumeAlone: () => {
      const v = volumeView(volume.status());
      return (cfg as { fencing?: string }).fencing === 'resource-and-stonith' && v.role === 'primary' && (v.connection === 'Connecting' || v.connection === 'StandAlone');
    },
    volumeSettlePeer: (how) => void volume.peerSettled?.(how),
    volumeOutdate: () => void volume.outdate?.(),
    volumePeerDisk: () => {
      const peer = field(volume.status(), 'peer');
      const disk = field(peer, 'disk');
      return typeof disk === 'string' ? disk : null;
    },
    healthExtras: () => {
      const v = volumeView(volume.status());
      return { replication: { connection: v.connection, protocol: v.protocol, outOfSyncBytes: v.outOfSyncBytes } };
    },
    close: async () => {
      await volume.close();
    },
  };
}
