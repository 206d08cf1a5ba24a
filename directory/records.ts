/**
 * Directory entries to records: the attribute mapping of ARCHITECTURE.md ("Directory") in
 * one place for both backends. Input is a lower-cased attribute map.
 */
import type { PairPlacementState, PairRecord, UserRecord } from './types.ts';

export type AttrMap = Map<string, string[]>;

export const USER_ATTRIBUTES = ['uid', 'mail', 'mailLocalAddress', 'mailHost', 'pairgateQuotaBytes'];
export const PAIR_ATTRIBUTES = ['cn', 'pairgateAddress', 'pairgatePorts', 'pairgateState', 'pairgateWeight'];

const STATES: readonly PairPlacementState[] = ['active', 'draining', 'maintenance', 'retired'];

export function first(attrs: AttrMap, name: string): string | undefined {
  return attrs.get(name.toLowerCase())?.[0];
}

export function all(attrs: AttrMap, name: string): string[] {
  return attrs.get(name.toLowerCase()) ?? [];
}

/** Addresses compare case-insensitively; records carry them lower-cased. */
export function normalizeAddress(address: string): string {
  return address.trim().toLowerCase();
}

export function toUserRecord(dn: string, attrs: AttrMap): UserRecord | null {
  // Names given lower-cased, as the map holds them (one look-up each, no new string).
  const uid = first(attrs, 'uid');
  if (!uid) return null;
  const mail = first(attrs, 'mail');
  const quota = first(attrs, 'pairgatequotabytes');
  const quotaBytes = quota !== undefined && /^\d+$/.test(quota.trim()) ? Number(quota.trim()) : undefined;
  const primary = mail ? normalizeAddress(mail) : '';
  const values = all(attrs, 'maillocaladdress');
  // Duplicates dropped: by a scan for the usual few, through a set for a long list.
  const seen = values.length > 16 ? new Set<string>() : null;
  const aliases: string[] = [];
  for (const raw of values) {
    const a = normalizeAddress(raw);
    if (!a || a === primary || (seen ? seen.has(a) : aliases.includes(a))) continue;
    seen?.add(a);
    aliases.push(a);
  }
  return {
    dn,
    uid,
    mail: primary,
    aliases,
    pair: (first(attrs, 'mailhost') ?? '').trim(),
    ...(quotaBytes !== undefined ? { quotaBytes } : {}),
  };
}

/**
 * `imap=10143,pop3=10110` (one or several values, comma or space separated) to a ports object.
 * Returns the parts it could not read in `bad`.
 */
export function parsePorts(values: string[]): { ports: Record<string, number>; bad: string[] } {
  const ports: Record<string, number> = {};
  const bad: string[] = [];
  for (const value of values) {
    for (const part of value.split(/[,\s]+/).filter(Boolean)) {
      const m = /^([A-Za-z][A-Za-z0-9_-]*)=(\d{1,5})$/.exec(part);
      const port = m ? Number(m[2]) : NaN;
      if (!m || port < 1 || port > 65535) bad.push(part);
      else ports[m[1]!.toLowerCase()] = port;
    }
  }
  return { ports, bad };
}

export interface PairParseProblem {
  dn: string;
  problem: string;
}

export function toPairRecord(dn: string, attrs: AttrMap, problems: PairParseProblem[] = []): PairRecord | null {
  const id = first(attrs, 'cn');
  if (!id) {
    problems.push({ dn, problem: 'pair entry without cn' });
    return null;
  }
  const rawState = (first(attrs, 'pairgateState') ?? '').trim().toLowerCase();
  let state: PairPlacementState;
  if ((STATES as readonly string[]).includes(rawState)) state = rawState as PairPlacementState;
  else {
    problems.push({ dn, problem: `pairgateState ${JSON.stringify(rawState)} is not one of ${STATES.join('|')}; treated as maintenance` });
    state = 'maintenance';
  }
  const rawWeight = (first(attrs, 'pairgateWeight') ?? '0').trim();
  const weight = /^-?\d+$/.test(rawWeight) ? Math.max(0, Number(rawWeight)) : 0;
  if (!/^-?\d+$/.test(rawWeight)) problems.push({ dn, problem: `pairgateWeight ${JSON.stringify(rawWeight)} is not an integer; treated as 0` });
  const { ports, bad } = parsePorts(all(attrs, 'pairgatePorts'));
  if (bad.length) problems.push({ dn, problem: `pairgatePorts parts ignored: ${bad.join(' ')} (expected name=port)` });
  return { id, dn, address: (first(attrs, 'pairgateAddress') ?? '').trim(), ports, state, weight };
}

export function formatPorts(ports: PairRecord['ports']): string {
  return Object.entries(ports)
    .map(([k, v]) => `${k}=${v}`)
    .join(',');
}
