/**
 * The directory: `openDirectory(config, deps)` returns the Directory (directory/types.ts)
 * over LDAP (config `urls`) or the embedded LDIF file (config `ldif`), with the caches of
 * directory.ts in front.
 */
import { validateConfig } from '../common/config.ts';
import type { Logger } from '../common/log.ts';
import type { MetricsRegistry } from '../common/metrics.ts';
import type { RedisBus } from '../common/redis-bus.ts';
import { directoryConfigSchema, type DirectoryConfig } from './config.ts';
import { CachingDirectory } from './directory.ts';
import { LdapBackend } from './ldap-backend.ts';
import { LdifBackend } from './ldif-backend.ts';
import { directoryMetrics } from './metrics.ts';
import type { Directory } from './types.ts';

export { directoryConfigSchema, type DirectoryConfig } from './config.ts';
export type * from './types.ts';

export interface DirectoryDeps {
  log: Logger;
  registry?: MetricsRegistry;
  bus?: RedisBus;
}

export async function openDirectory(config: unknown, deps: DirectoryDeps): Promise<Directory> {
  const c: DirectoryConfig = validateConfig(directoryConfigSchema, config, 'directory config');
  const log = deps.log.child({ component: 'directory' });
  const metrics = directoryMetrics(deps.registry);
  const backend = c.urls
    ? new LdapBackend(c, { log, metrics })
    : await LdifBackend.open({ file: c.ldif!, usersDn: c.usersDn, watch: c.watch, log });
  log.info(
    c.urls ? { backend: 'ldap', urls: c.urls, baseDn: c.baseDn, redisCache: !!deps.bus && c.cache.redis } : { backend: 'ldif', file: c.ldif, redisCache: !!deps.bus && c.cache.redis },
    'directory opened',
  );
  const directory = new CachingDirectory({ backend, cache: c.cache, log, metrics, bus: deps.bus });
  // A directory that shows no pairs (wrong base, or ACLs hiding entries from the bind DN)
  // would route nobody: say so at once rather than at the first failed delivery.
  directory.listPairs().then(
    (pairs) => {
      if (pairs.length === 0) log.warn({ backend: c.urls ? 'ldap' : 'ldif', bindDn: c.bindDn }, 'directory: no pairs visible; check baseDn/pairsDn and that the bind DN may read them');
    },
    () => undefined,
  );
  return directory;
}
