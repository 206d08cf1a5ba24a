/**
 * The volume's metrics (names are a contract for the HA dashboard: replication out-of-sync
 * bytes, resync rate, write latency). The pair-agent's registry adds `pair` and `node`.
 */
import { counter, gauge, histogram, type MetricsRegistry } from '../../common/metrics.ts';

export function volumeMetrics(registry: MetricsRegistry, volume: string) {
  const labels = { volume };
  const sent = counter(registry, 'replication_bytes_sent_total', 'Bytes sent to the peer by kind (data, resync)', ['volume', 'kind']);
  const rejected = counter(registry, 'replication_frames_rejected_total', 'Frames or handshakes refused (bad frame, auth, protocol)', ['volume', 'reason']);
  for (const reason of ['bad-frame', 'auth', 'protocol']) rejected.inc({ volume, reason }, 0);
  const g = (name: string, help: string) => gauge(registry, name, help, ['volume']).labels(labels);
  return {
    role: g('volume_role', 'Volume role: 1 primary, 0 secondary'),
    diskUpToDate: g('volume_disk_up_to_date', 'Local data is UpToDate (1) or not (0: Inconsistent, Failed)'),
    connected: g('replication_connected', 'Replication link connected (1) or not (0)'),
    splitBrain: g('replication_split_brain', 'A split brain waits for the operator (1)'),
    writesHeld: g('volume_writes_held', 'Writes held until the peer is outdated or fenced (1; fencing resource-and-stonith)'),
    outOfSync: g('replication_out_of_sync_bytes', 'Bytes marked out of sync with the peer'),
    resyncRate: g('replication_resync_bytes_per_second', 'Current resync rate'),
    resyncProgress: g('replication_resync_progress_ratio', 'Resync progress, 0..1 (1 when none runs)'),
    writes: counter(registry, 'volume_writes_total', 'Writes acknowledged to the store', ['volume']).labels(labels),
    writeSeconds: histogram(registry, 'volume_write_seconds', 'Write latency until acknowledged per the protocol', ['volume']).labels(labels),
    bytesSent: (kind: 'data' | 'resync', bytes: number) => sent.inc({ volume, kind }, bytes),
    framesRejected: (reason: string) => rejected.inc({ volume, reason }),
    splitBrains: counter(registry, 'replication_split_brains_total', 'Split brains detected', ['volume']).labels(labels),
    verifyOutOfSync: counter(registry, 'replication_verify_out_of_sync_blocks_total', 'Blocks found different by online verify', ['volume']).labels(labels),
  };
}

export type VolumeMetrics = ReturnType<typeof volumeMetrics>;
