/**
 * The store agent as a pair resource, from pair-agent/store/resource.ts (createStoreResource,
 * storeConfigSchema): it serves LMTP, IMAP and POP3 on the pair's address, on the replicated
 * volume as its block device, and reports store figures and sessions for the health record.
 */
import type { ZodTypeAny } from 'zod';
import { validateConfig } from '../../common/config.ts';
import { ConfigError } from '../../common/errors.ts';
import type { Logger } from '../../common/log.ts';
import type { MetricsRegistry } from '../../common/metrics.ts';
import type { Resource } from '../resource.ts';
import type { HealthExtras, OptionalResources } from './optional.ts';
import type { VolumeResource } from './volume.ts';

type StoreRes = Resource & { health(): unknown; sessions(): { imap: number; pop3: number; lmtp: number } };

export async function storeResource(
  mod: Record<string, unknown>,
  raw: Record<string, unknown>,
  have: OptionalResources,
  deps: { log: Logger; registry: MetricsRegistry; listenHost: string },
): Promise<{ resource: Resource; extras: () => HealthExtras }> {
  const schema = mod.storeConfigSchema as ZodTypeAny | undefined;
  const create = mod.createStoreResource as ((o: Record<string, unknown>) => StoreRes) | undefined;
  if (!schema || typeof create !== 'function') throw new ConfigError('store', 'pair-agent/store/resource.ts does not export storeConfigSchema and createStoreResource');
  let config: unknown;
  try {
    config = validateConfig(schema, raw, 'store');
  } catch (err) {
    const e = err as ConfigError;
    throw new ConfigError(`store.${e.key ?? ''}`.replace(/\.$/, ''), e.message.replace(/^[^:]*: /, ''));
  }
  const device = (have.volume as VolumeResource).volume;
  const store = create({ config, device, listenHost: deps.listenHost, log: deps.log.child({ part: 'store' }), registry: deps.registry });
  const num = (o: unknown, k: string) => {
    const v = (o as Record<string, unknown> | null)?.[k];
    return typeof v === 'number' ? v : 0;
  };
  return {
    resource: store,
    extras: () => {
      const h = store.health();
      return {
        store: { mailboxes: num(h, 'mailboxes'), messages: num(h, 'messages'), bytesUsed: num(h, 'bytesUsed'), bytesTotal: num(h, 'bytesTotal') },
        sessions: store.sessions(),
      };
    },
  };
}
