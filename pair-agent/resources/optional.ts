/**
 * The replicated volume and store resources come from their own modules (pair-agent/volume,
 * pair-agent/store, other engineers' work). They are loaded only when configured; a configured
 * one whose module is not there is a start error naming the key (exit 2), never silently skipped.
 */
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { ConfigError } from '../../common/errors.ts';
import type { Logger } from '../../common/log.ts';
import type { MetricsRegistry } from '../../common/metrics.ts';
import type { Resource } from '../resource.ts';
import type { PairAgentConfig } from '../config.ts';

export interface HealthExtras {
  replication?: { connection: string; protocol: string; outOfSyncBytes: number };
  store?: { mailboxes: number; messages: number; bytesUsed: number; bytesTotal: number };
  sessions?: { imap: number; pop3: number; lmtp: number };
}

export interface OptionalResources {
  volume?: Resource;
  store?: Resource;
  volumeDisk?: () => string;
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
  deps: { log: Logger; registry: MetricsRegistry; listenHost: string },
): Promise<OptionalResources> {
  const out: OptionalResources = {};
  if (config.volume) {
    const mod = await importIfPresent('volume/index.ts');
    if (!mod) throw new ConfigError('volume', 'the replicated volume module (pair-agent/volume/index.ts) is not installed in this build');
    const { volumeResource } = (await import('./volume.ts')) as typeof import('./volume.ts');
    Object.assign(out, await volumeResource(mod, config.volume, deps));
  }
  if (config.store) {
    const mod = await importIfPresent('store/resource.ts');
    if (!mod) throw new ConfigError('store', 'the store module (pair-agent/store/resource.ts) is not installed in this build');
    if (!out.volume) throw new ConfigError('store', 'the store needs a replicated volume: configure `volume` too');
    const { storeResource } = (await import('./store.ts')) as typeof import('./store.ts');
    const store = await storeResource(mod, config.store, out, deps);
    const volExtras = out.healthExtras;
    out.store = store.resource;
    out.healthExtras = () => ({ ...volExtras?.(), ...store.extras() });
  }
  return out;
}
