/** The directory's metrics; names are a dashboard contract (infra/grafana). */
import { counter, createRegistry, histogram, type MetricsRegistry } from '../common/metrics.ts';

export function directoryMetrics(registry: MetricsRegistry = createRegistry({}, false)) {
  return {
    /** result: found | not_found | error. */
    lookups: counter(registry, 'directory_lookups_total', 'Directory lookups (login and recipient) by result', ['result'] as const),
    /** layer: lru | redis; result: hit | miss. */
    cache: counter(registry, 'directory_cache_total', 'Directory cache look-ups by layer and result', ['layer', 'result'] as const),
    ldapSeconds: histogram(registry, 'directory_ldap_seconds', 'LDAP operation latency by operation', ['op'] as const),
    /** Look-ups that shared one LDAP search (ldap-batch.ts); outcome: answered | asked_again (each asked alone after). */
    ldapBatched: counter(registry, 'directory_ldap_batched_lookups_total', 'Look-ups sent in a shared LDAP search, by outcome', ['outcome'] as const),
    /** kind: connect | timeout | closed | tls | server | other. */
    ldapErrors: counter(registry, 'directory_ldap_errors_total', 'LDAP errors that made a server skipped, by kind', ['kind'] as const),
    /** result: ok | fail | error. */
    auth: counter(registry, 'directory_auth_total', 'Directory authentications by result', ['result'] as const),
  };
}

export type DirectoryMetrics = ReturnType<typeof directoryMetrics>;
