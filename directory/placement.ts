/**
 * Placement of new users: among `active` pairs, the one with the most free capacity
 * (weight minus users already homed there); ties go to the lowest id.
 */
import type { PairRecord } from './types.ts';

export function choosePair(pairs: PairRecord[], counts: Map<string, number>): PairRecord | null {
  let best: PairRecord | null = null;
  let bestFree = -Infinity;
  for (const p of [...pairs].sort((a, b) => a.id.localeCompare(b.id))) {
    if (p.state !== 'active' || p.weight <= 0) continue;
    const free = p.weight - (counts.get(p.id) ?? 0);
    if (free > bestFree) {
      best = p;
      bestFree = free;
    }
  }
  return best;
}
