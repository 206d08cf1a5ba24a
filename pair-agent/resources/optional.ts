/**
 * The replicated volume and store resources come from their own modules (pair-agent/volume,
 * pair-agent/store, other engineers' work). The volume module is loaded only when configured (a
 * configured one whose module is not there is a start error naming the key, exit 2); the store
 * runs on the volume, or on a shared disk (one writer, kept so by fencing).
 */
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { ConfigError } from '../../common/errors.ts';
import type { Logger } from '../../common/log.ts';
import type { MetricsRegistry } from '../../common/metrics.ts';
import type { Resource } from '../resource.ts';
import type { PairAgentConfig } from '../config.ts';
import { createStoreResource } from '../store/resource.ts';
import { FileBlockDevice, type BlockDevice } from '../volume/block-device.ts';
import type { VolumeResource } from './volume.ts';

export interface HealthExtras {
  replication?: { connection: string; protocol: string; outOfSyncBytes: number };
  store?: { mailboxes: number; messages: number; bytesUsed: number; bytesTotal: number };
  sessions?: { imap: number; pop3: number; lmtp: number };
}

export interface OptionalResources {
  volume?: Resource;
  store?: Resource;
  volumeDisk?: () => string;
  /** The volume's role (primary / secondary). */
  volumeRole?: () => string;
  /** The volume's data generation UUIDs: current first, then bitmap and history. */
  volumeUuids?: () => string[];
  /** The peer's disk state as the replication link knows it, or null while not connected. */
  volumePeerDisk?: () => string | null;
  /** Since when writes are held until the peer cannot be promoted with old data (fencing resource-and-stonith), or null. */
  volumeFenceSince?: () => number | null;
  /** Fails the held writes (never acknowledged): the node releases or stops. */
  volumeFailHeld?: (why: string) => void;
  /** The peer is outdated or fenced: held writes go on. */
  volumeSettlePeer?: (how: 'outdated' | 'fenced') => void;
  /** This node's volume is primary without a connected peer, with fencing on: the peer is to outdate itself. */
  volumeAlone?: () => boolean;
  /** Marks this node's (secondary) data Outdated at the primary's request; throws when it may not. */
  volumeOutdate?: () => void;
  healthExtras?: () => HealthExtras;
  close?: () => Promise<void>;
}

const here = dirname(fileURLToPath(import.meta.url));

async function importIfPresent(rel: string): Promise<Record<string, unknown> | null> {
  const file = join(here, '..', rel);
  if (!existsSync(file)) return null;
  return (await import(pathToFileURL(file).href)) as Record<string, unknown>;
}

export async function loadOptionalResources(
  config: PairAgentConfig,
  deps: { log: Logger; registry: MetricsRegistry; listenHost: string; onChange?: (why: string) => void },
): Promise<OptionalResources> {
  const out: OptionalResources = {};
  if (config.volume) {
    const mod = await importIfPresent('volume/index.ts');
    if (!mod) throw new ConfigError('volume', 'the replicated volume module (pair-agent/volume/index.ts) is not installed in this build');
    const { volumeResource } = (await import('./volume.ts')) as typeof import('./volume.ts');
    Object.assign(out, await volumeResource(mod, config.volume, deps));
  }
  let device: BlockDevice | null = null;
  if (out.volume) device = (out.volume as VolumeResource).volume as unknown as BlockDevice;
  if (config.sharedDisk) {
    const disk = await FileBlockDevice.open(config.sharedDisk.file, { size: config.sharedDisk.sizeBytes, create: true });
    device = disk;
    const closeVolume = out.close;
    out.close = async () => {
      await closeVolume?.();
      await disk.close();
    };
  }
  if (config.store) {
    if (!device) throw new ConfigError('store', 'the store needs a disk: configure `volume` (replicated) or `sharedDisk`');
    const store = createStoreResource({ config: config.store, device, listenHost: deps.listenHost, log: deps.log, registry: deps.registry });
    const volExtras = out.healthExtras;
    out.store = store;
    out.healthExtras = () => {
      const h = store.health();
      return {
        ...volExtras?.(),
        store: { mailboxes: h.mailboxes, messages: h.messages, bytesUsed: h.bytesUsed, bytesTotal: h.bytesTotal },
        sessions: store.sessions(),
      };
    };
  }
  return out;
}
