/**
 * Who resyncs whom when two nodes meet, decided from their data generation UUIDs alone, as
 * DRBD's drbd_uuid_compare does. Both nodes run the same function on the same two inputs (each
 * with itself as `self`), so they reach mirror-image decisions without a further round trip.
 *
 * The UUIDs move like this: a primary that loses its peer (or is promoted alone) keeps its old
 * current UUID as the bitmap UUID and starts a new current one; the bitmap then records every
 * block written since. A finished resync moves the bitmap UUID into the history.
 */
import { JUST_CREATED, NO_UUID, type Uuids } from './metadata.ts';

export interface UuidSide {
  uuids: Uuids;
  /** Was primary when it stopped without a clean demotion (activity-log extents may differ). */
  primaryCrashed: boolean;
  /** Tie-break for the rare case that both crashed as primary of the same generation. */
  name: string;
}

export type SyncDecision =
  /** Same data: nothing to send. */
  | 'no-sync'
  /** Send the blocks in both bitmaps to the peer. */
  | 'source'
  | 'target'
  /** The bitmap cannot be trusted (the peer is further back than one generation): every block. */
  | 'source-full'
  | 'target-full'
  /** Both changed since they parted: never merged silently; the after-split-brain policy decides. */
  | 'split-brain'
  /** No common history: refuse to connect. */
  | 'unrelated';

export interface Comparison {
  decision: SyncDecision;
  /** DRBD-style rule number, for logs and tests. */
  rule: number;
}

const mirror: Record<SyncDecision, SyncDecision> = {
  'no-sync': 'no-sync',
  source: 'target',
  target: 'source',
  'source-full': 'target-full',
  'target-full': 'source-full',
  'split-brain': 'split-brain',
  unrelated: 'unrelated',
};

export function mirrorDecision(d: SyncDecision): SyncDecision {
  return mirror[d];
}

function isSet(u: string): boolean {
  return u !== NO_UUID;
}

export function compareUuids(self: UuidSide, peer: UuidSide): Comparison {
  const s = self.uuids;
  const p = peer.uuids;
  const sNew = s.current === JUST_CREATED || s.current === NO_UUID;
  const pNew = p.current === JUST_CREATED || p.current === NO_UUID;
  // 10: two volumes just created: identical by definition (no initial full sync, like
  // `drbdadm new-current-uuid --clear-bitmap` on fresh disks).
  if (sNew && pNew) return { decision: 'no-sync', rule: 10 };
  // 15: one side was promoted alone while both were still "just created": its bitmap holds
  // every block it wrote since, so a bitmap resync suffices (rules 50/70 on the fresh state).
  if (pNew && s.bitmap === p.current) return { decision: 'source', rule: 15 };
  if (sNew && p.bitmap === s.current) return { decision: 'target', rule: 15 };
  // 20/30: one side never held data: it takes everything from the other.
  if (sNew) return { decision: 'target-full', rule: 20 };
  if (pNew) return { decision: 'source-full', rule: 30 };

  if (s.current === p.current) {
    // 40: same generation. A primary that crashed may have writes in flight that never reached
    // the peer (or that only the peer has): it resends its activity-log extents.
    if (self.primaryCrashed && !peer.primaryCrashed) return { decision: 'source', rule: 40 };
    if (peer.primaryCrashed && !self.primaryCrashed) return { decision: 'target', rule: 40 };
    if (self.primaryCrashed && peer.primaryCrashed) return { decision: self.name < peer.name ? 'source' : 'target', rule: 41 };
    return { decision: 'no-sync', rule: 42 };
  }
  // 50: the peer started a new generation from ours and we did not: we are behind by its bitmap.
  if (isSet(p.bitmap) && p.bitmap === s.current) return { decision: 'target', rule: 50 };
  // 60: our current generation is in the peer's history: too far behind for the bitmap.
  if (p.history.includes(s.current)) return { decision: 'target-full', rule: 60 };
  // 70/80: the mirror images of 50/60.
  if (isSet(s.bitmap) && s.bitmap === p.current) return { decision: 'source', rule: 70 };
  if (s.history.includes(p.current)) return { decision: 'source-full', rule: 80 };
  // 90: both started new generations from the same one: split brain, bitmaps usable.
  if (isSet(s.bitmap) && s.bitmap === p.bitmap) return { decision: 'split-brain', rule: 90 };
  // 100: some older common ancestor: split brain as well (a full resync will settle it).
  const mine = [s.bitmap, ...s.history].filter(isSet);
  const theirs = [p.bitmap, ...p.history].filter(isSet);
  if (mine.some((u) => theirs.includes(u))) return { decision: 'split-brain', rule: 100 };
  return { decision: 'unrelated', rule: 1000 };
}

export type AfterSb0Pri = 'disconnect' | 'discard-zero-changes' | 'discard-younger-primary' | 'discard-least-changes';
export type AfterSb1Pri = 'disconnect' | 'consensus' | 'discard-secondary';

export interface SbSide {
  /** Blocks changed since the split (bitmap bits). */
  changes: number;
  primary: boolean;
  /** When it became primary of its current generation (ms). */
  primarySince: number;
  name: string;
}

/**
 * DRBD's after-split-brain policies. Returns the side whose changes are discarded (it becomes
 * the sync target), or null: stay disconnected until the operator resolves it by hand.
 */
export function splitBrainVictim(
  self: SbSide,
  peer: SbSide,
  policy: { afterSb0Pri: AfterSb0Pri; afterSb1Pri: AfterSb1Pri },
): 'self' | 'peer' | null {
  const primaries = (self.primary ? 1 : 0) + (peer.primary ? 1 : 0);
  if (primaries === 2) return null; // never decided automatically with two primaries
  const zeroPri = (): 'self' | 'peer' | null => {
    switch (policy.afterSb0Pri) {
      case 'disconnect':
        return null;
      case 'discard-zero-changes':
        if (self.changes === 0 && peer.changes === 0) return self.name < peer.name ? 'peer' : 'self';
        if (self.changes === 0) return 'self';
        if (peer.changes === 0) return 'peer';
        return null;
      case 'discard-younger-primary':
        if (self.primarySince === peer.primarySince) return self.name < peer.name ? 'peer' : 'self';
        return self.primarySince > peer.primarySince ? 'self' : 'peer';
      case 'discard-least-changes':
        if (self.changes === peer.changes) return self.name < peer.name ? 'peer' : 'self';
        return self.changes < peer.changes ? 'self' : 'peer';
    }
  };
  if (primaries === 0) return zeroPri();
  const secondary = self.primary ? 'peer' : 'self';
  switch (policy.afterSb1Pri) {
    case 'disconnect':
      return null;
    case 'discard-secondary':
      return secondary;
    case 'consensus': {
      // Only when the 0-primary policy would discard the secondary anyway.
      const v = zeroPri();
      return v === secondary ? v : null;
    }
  }
}
