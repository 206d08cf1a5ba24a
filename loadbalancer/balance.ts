/**
 * Balancing algorithms, pure and synchronous (no sockets), so that their distributions are
 * unit-tested against their definitions:
 *
 * - `leastconn`: the backend with the fewest active connections per unit of weight
 *   (active+1)/weight; ties go round-robin, as HAProxy's leastconn does.
 * - `roundrobin`: smooth weighted round-robin (nginx's algorithm): over any window of
 *   sum(weights) picks, each backend gets exactly its weight, interleaved.
 * - `source`: consistent hashing of the client address on a ring with `weight × 160` points per
 *   backend keyed by the backend's name, so adding a backend moves about 1/(n+1) of the clients
 *   and removing one moves only its own clients. A backend that cannot take the client (down,
 *   drained, full) is skipped by walking on along the ring.
 */
import { createHash } from 'node:crypto';
import type { BalanceMethod } from './config.ts';

export interface Candidate {
  /** Stable name (the ring is keyed on it). */
  readonly name: string;
  /** Configured weight (before slow start). */
  readonly weight: number;
  /** Weight now, after slow start; 0 takes nothing. */
  effectiveWeight(now: number): number;
  /** Active connections (for leastconn). */
  readonly active: number;
  /** Whether it may take a new connection now (up, ready, under maxconn). */
  eligible(): boolean;
}

const POINTS_PER_WEIGHT = 160;

function hash32(s: string): number {
  // First 4 bytes of MD5: well spread, cheap enough for a ring built on config change.
  return createHash('md5').update(s).digest().readUInt32BE(0);
}

/** FNV-1a of the client address: fast per connection. */
export function hashAddress(addr: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < addr.length; i++) {
    h ^= addr.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  // Final avalanche (murmur3 fmix32), so that neighbouring addresses land far apart.
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

export class Balancer<C extends Candidate> {
  private rr = 0;
  private readonly current = new Map<C, number>();
  private ring: { points: Uint32Array; owners: C[] } | null = null;

  constructor(
    readonly method: BalanceMethod,
    private backends: C[],
  ) {}

  /** Replaces the backend list (config reload, weight change); the ring is rebuilt lazily. */
  setBackends(backends: C[]): void {
    this.backends = backends;
    this.ring = null;
    for (const k of [...this.current.keys()]) if (!backends.includes(k)) this.current.delete(k);
  }

  /** Weight changed: the ring depends on it. */
  invalidate(): void {
    this.ring = null;
  }

  /** Picks a backend for a client, skipping `exclude` (backends already tried); null if none can take it. */
  pick(clientAddress: string, exclude: ReadonlySet<C> = new Set(), now = Date.now()): C | null {
    switch (this.method) {
      case 'leastconn':
        return this.leastconn(exclude, now);
      case 'roundrobin':
        return this.roundrobin(exclude, now);
      case 'source':
        return this.source(clientAddress, exclude);
    }
  }

  private leastconn(exclude: ReadonlySet<C>, now: number): C | null {
    const n = this.backends.length;
    let best: C | null = null;
    let bestScore = Infinity;
    const start = this.rr++ % Math.max(1, n);
    for (let k = 0; k < n; k++) {
      const b = this.backends[(start + k) % n]!;
      if (exclude.has(b) || !b.eligible()) continue;
      const w = b.effectiveWeight(now);
      if (w <= 0) continue;
      const score = (b.active + 1) / w;
      if (score < bestScore) {
        best = b;
        bestScore = score;
      }
    }
    return best;
  }

  private roundrobin(exclude: ReadonlySet<C>, now: number): C | null {
    let total = 0;
    let best: C | null = null;
    let bestCur = -Infinity;
    for (const b of this.backends) {
      if (exclude.has(b) || !b.eligible()) continue;
      const w = b.effectiveWeight(now);
      if (w <= 0) continue;
      const cur = (this.current.get(b) ?? 0) + w;
      this.current.set(b, cur);
      total += w;
      if (cur > bestCur) {
        best = b;
        bestCur = cur;
      }
    }
    if (best) this.current.set(best, bestCur - total);
    return best;
  }

  private buildRing(): { points: Uint32Array; owners: C[] } {
    const entries: Array<[number, C]> = [];
    for (const b of this.backends) {
      const n = b.weight * POINTS_PER_WEIGHT;
      for (let i = 0; i < n; i++) entries.push([hash32(`${b.name}#${i}`), b]);
    }
    entries.sort((x, y) => x[0] - y[0]);
    return { points: Uint32Array.from(entries.map((e) => e[0])), owners: entries.map((e) => e[1]) };
  }

  private source(clientAddress: string, exclude: ReadonlySet<C>): C | null {
    this.ring ??= this.buildRing();
    const { points, owners } = this.ring;
    if (points.length === 0) return null;
    const h = hashAddress(clientAddress);
    let lo = 0;
    let hi = points.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (points[mid]! < h) lo = mid + 1;
      else hi = mid;
    }
    const seen = new Set<C>();
    for (let k = 0; k < points.length && seen.size < this.backends.length; k++) {
      const b = owners[(lo + k) % points.length]!;
      if (seen.has(b)) continue;
      seen.add(b);
      if (!exclude.has(b) && b.eligible()) return b;
    }
    return null;
  }
}
