/**
 * Shared set-up for the proxy integration tests (not a test file itself): the directory the
 * tests route with, and the pairs' admin `/health` endpoints the proxy polls.
 */
import { existsSync } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { dirname, join as joinPath } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { Directory, PairRecord, UserRecord } from '../../directory/types.ts';
import { AuthError, NotFoundError, UnavailableError } from '../../common/errors.ts';
import type { Logger } from '../../common/log.ts';
import type { HealthRecord, PairState } from '../../common/health.ts';

// The directory (directory/index.ts) is built by another part in parallel. When it is in the
// tree these tests use it (LDIF-file backend, binds checked against {SSHA} hashes); until then
// the same users and pairs are served by `tableDirectory`, a small in-test implementation of
// the Directory contract (only the calls the proxy makes), so the proxy is still tested.
const DIRECTORY_MODULE = joinPath(dirname(fileURLToPath(import.meta.url)), '../../directory/index.ts');
export const haveDirectory = existsSync(DIRECTORY_MODULE);

export function tableDirectory(users: Array<{ uid: string; password: string; pair: string }>, pairs: PairRecord[]): Directory {
  const record = (u: { uid: string; pair: string }): UserRecord => ({ dn: `uid=${u.uid},ou=people,dc=pairgate,dc=test`, uid: u.uid, mail: `${u.uid}@example.net`, aliases: [], pair: u.pair });
  const find = (login: string) => users.find((u) => u.uid === login || `${u.uid}@example.net` === login);
  return {
    findLogin: async (login) => {
      const u = find(login);
      return u ? record(u) : null;
    },
    findRecipient: async (address) => {
      const u = users.find((x) => `${x.uid}@example.net` === address);
      return u ? record(u) : null;
    },
    authenticate: async (login, password) => {
      const u = find(login);
      if (!u || u.password !== password) throw new AuthError('invalid credentials');
      return record(u);
    },
    routeFor: async (user) => {
      const pair = pairs.find((p) => p.id === user.pair);
      if (!pair) throw new NotFoundError(`no pair ${user.pair}`);
      return { user, pair };
    },
    listPairs: async () => pairs,
    getPair: async (id) => pairs.find((p) => p.id === id) ?? null,
    placeNewUser: async () => pairs[0]!,
    addUser: async () => {
      throw new UnavailableError('not supported by the table directory');
    },
    setUserPair: async () => undefined,
    invalidate: async () => undefined,
    close: async () => undefined,
  };
}

export async function openDirectory(config: unknown, deps: { log: Logger }): Promise<Directory> {
  const mod = (await import(pathToFileURL(DIRECTORY_MODULE).href)) as { openDirectory(c: unknown, d: { log: Logger }): Promise<Directory> };
  return mod.openDirectory(config, deps);
}

/** The record a pair's admin `/health` serves (as its active pair-agent does), in a given state. */
export function healthRecord(pair: string, state: PairState): HealthRecord {
  return {
    pair,
    at: Date.now(),
    state,
    primary: 'a',
    nodes: { a: { heartbeat: 'up', role: 'primary', disk: 'UpToDate' }, b: { heartbeat: 'up', role: 'secondary', disk: 'UpToDate' } },
    replication: { connection: 'Connected', protocol: 'C', outOfSyncBytes: 0 },
    store: { mailboxes: 2, messages: 0, bytesUsed: 0, bytesTotal: 1 << 30 },
    sessions: { imap: 0, pop3: 0, lmtp: 0 },
  };
}

/** A pair's admin endpoint on loopback with a settable state (200 while ok or degraded, else 503). */
export async function pairAdmin(id: string): Promise<{ port: number; set(s: PairState): void; close(): Promise<void> }> {
  let state: PairState = 'ok';
  const server = http.createServer((_req, res) => {
    res.writeHead(state === 'ok' || state === 'degraded' ? 200 : 503, { 'content-type': 'application/json' });
    res.end(JSON.stringify(healthRecord(id, state)));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    port: (server.address() as AddressInfo).port,
    set(s: PairState) {
      state = s;
    },
    close: () => new Promise<void>((r) => server.close(() => r())),
  };
}
