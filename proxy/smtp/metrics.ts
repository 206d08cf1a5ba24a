/** Metrics of the SMTP front ends (names are a contract with the Grafana dashboards). */
import { counter, histogram, type MetricsRegistry } from '../../common/metrics.ts';
import { proxyMetrics } from '../metrics.ts';

export function smtpMetrics(registry: MetricsRegistry) {
  const shared = proxyMetrics(registry);
  return {
    /** pairgate_sessions{protocol="smtp",pair="",role="proxy"}: shared with the IMAP/POP3 front ends. */
    sessions: shared.sessions,
    sessionsTotal: shared.sessionsTotal,
    logins: shared.logins,
    throttled: shared.throttled,
    rejectedConnections: shared.rejected,
    /** Per recipient: ok | tempfail | rejected (LMTP to a pair or relay through the smarthost). */
    deliveries: counter(registry, 'deliveries_total', 'Recipients delivered by result', ['result']),
    /** End of DATA to the reply, per message (all pairs and the smarthost). */
    deliverySeconds: histogram(registry, 'delivery_seconds', 'Time from the end of DATA to the reply, per message'),
    rejects: counter(registry, 'smtp_rejects_total', 'SMTP commands or messages refused, by reason', ['reason']),
    bounces: counter(registry, 'smtp_bounces_total', 'Bounces (DSN) for recipients that refused an accepted message, by result', ['result']),
    messages: counter(registry, 'smtp_messages_total', 'Messages after DATA by outcome', ['kind', 'result']),
  };
}

export type SmtpMetrics = ReturnType<typeof smtpMetrics>;
