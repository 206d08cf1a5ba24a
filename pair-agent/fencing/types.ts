/**
 * STONITH devices. A fence yields a typed outcome; anything but `ok` (failed, timeout, error,
 * an answer we do not understand) counts as failure, so the node does not take over.
 */
export type FenceAction = 'off' | 'reboot' | 'status';
export type FenceOutcomeKind = 'ok' | 'failed' | 'timeout' | 'error';

export interface FenceOutcome {
  outcome: FenceOutcomeKind;
  /** One line for logs and health (never a secret). */
  detail: string;
}

export interface FenceDevice {
  readonly kind: string;
  /** Powers off (or reboots) the peer and resolves `ok` only when that is confirmed. Never throws. */
  fence(action: 'off' | 'reboot', signal: AbortSignal): Promise<FenceOutcome>;
  /**
   * Optional cheap check that the peer is certainly off already (the lab's process device: no
   * such process). A peer that is off cannot win a fence race, so the fence delay is skipped.
   */
  isCertainlyOff?(): boolean;
}
