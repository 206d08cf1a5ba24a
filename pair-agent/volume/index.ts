/**
 * The replicated volume (issue 3): what the pair agent and the CLI import.
 * `openReplicatedVolume` opens (creating when missing) one node's volume and starts its link.
 */
import { validateConfig } from '../../common/config.ts';
import type { Logger } from '../../common/log.ts';
import type { MetricsRegistry } from '../../common/metrics.ts';
import { volumeConfigSchema, type VolumeConfig } from './config.ts';
import { ReplicatedVolume } from './replicated-volume.ts';
import { startVolumeAdmin } from './admin.ts';

export { volumeConfigSchema, type VolumeConfig } from './config.ts';
export { ReplicatedVolume, type VolumeStatus, type Role, type ConnectionState } from './replicated-volume.ts';
export { BLOCK_SIZE, type BlockDevice } from './block-device.ts';

export async function openReplicatedVolume(config: VolumeConfig | unknown, deps: { log: Logger; registry: MetricsRegistry }): Promise<ReplicatedVolume> {
  const parsed = validateConfig(volumeConfigSchema, config, 'volume');
  const volume = await ReplicatedVolume.open(parsed, deps);
  if (parsed.admin) {
    // Inside a pair-agent: the volume's own listener, so `pairgate volume status --config` works there too.
    const admin = await startVolumeAdmin(volume, parsed.admin, deps).catch(async (err) => {
      await volume.close();
      throw err;
    });
    volume.once('closed', () => void admin.close());
  }
  return volume;
}
