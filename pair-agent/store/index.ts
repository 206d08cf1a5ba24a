/**
 * The mail store: `openMailStore` opens (recovering, or formatting a blank device) the
 * log-structured store on a BlockDevice. See store.ts for the design, log.ts for the layout.
 */
import type { BlockDevice } from '../volume/block-device.ts';
import { LogStore, type OpenStoreOptions } from './store.ts';

export type { MailStore } from './types.ts';
export { LogStore, type OpenStoreOptions, type CheckReport, type CompactResult, type RecoveryReport } from './store.ts';

export function openMailStore(device: BlockDevice, opts: OpenStoreOptions): Promise<LogStore> {
  return LogStore.open(device, opts);
}
