/**
 * Sequence sets and UID sets (RFC 3501 `sequence-set`): `1`, `2:4`, `7:*`, `*`, comma lists.
 * `*` stands for the largest number in use (the last sequence number, or the highest UID), and
 * a range is unordered (`4:2` equals `2:4`). Parsed once, then resolved against a mailbox view
 * without expanding `1:4294967295` into an array.
 */
export const STAR = -1;

export interface SeqSet {
  ranges: Array<[number, number]>;
  text: string;
}

const MAX = 4294967295;

export class SeqSetError extends Error {}

export function parseSeqSet(text: string): SeqSet {
  if (!text || text.length > 100_000) throw new SeqSetError('invalid sequence set');
  const ranges: Array<[number, number]> = [];
  for (const part of text.split(',')) {
    const m = /^(\d+|\*)(?::(\d+|\*))?$/.exec(part);
    if (!m) throw new SeqSetError(`invalid sequence set ${JSON.stringify(text.slice(0, 40))}`);
    const a = m[1] === '*' ? STAR : Number(m[1]);
    const b = m[2] === undefined ? a : m[2] === '*' ? STAR : Number(m[2]);
    for (const n of [a, b]) {
      if (n === 0 || n > MAX || (n !== STAR && !Number.isSafeInteger(n))) throw new SeqSetError(`invalid number in sequence set ${JSON.stringify(text.slice(0, 40))}`);
    }
    ranges.push([a, b]);
  }
  return { ranges, text };
}

export function isSeqSet(text: string): boolean {
  try {
    parseSeqSet(text);
    return true;
  } catch {
    return false;
  }
}

/** Normalised [lo, hi] ranges with `*` replaced by `max` (for an empty mailbox, `*` matches nothing). */
export function resolveRanges(set: SeqSet, max: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (const [a0, b0] of set.ranges) {
    const a = a0 === STAR ? max : a0;
    const b = b0 === STAR ? max : b0;
    if (a === 0 || b === 0) continue;
    out.push(a <= b ? [a, b] : [b, a]);
  }
  out.sort((x, y) => x[0] - y[0]);
  const merged: Array<[number, number]> = [];
  for (const r of out) {
    const last = merged[merged.length - 1];
    if (last && r[0] <= last[1] + 1) last[1] = Math.max(last[1], r[1]);
    else merged.push([r[0], r[1]]);
  }
  return merged;
}

/** Membership test against resolved ranges (binary search). */
export function inRanges(ranges: Array<[number, number]>, n: number): boolean {
  let lo = 0;
  let hi = ranges.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    const r = ranges[mid]!;
    if (n < r[0]) hi = mid - 1;
    else if (n > r[1]) lo = mid + 1;
    else return true;
  }
  return false;
}

/** Compact text form of a sorted list of numbers: `1:3,5,8:9` (for COPYUID, MODIFIED, SEARCH). */
export function formatSet(nums: number[]): string {
  if (nums.length === 0) return '';
  const parts: string[] = [];
  let start = nums[0]!;
  let prev = start;
  for (let k = 1; k <= nums.length; k++) {
    const n = nums[k];
    if (n !== undefined && n === prev + 1) {
      prev = n;
      continue;
    }
    parts.push(start === prev ? String(start) : `${start}:${prev}`);
    if (n !== undefined) start = prev = n;
  }
  return parts.join(',');
}
