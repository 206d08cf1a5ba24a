/**
 * Shared set-up for the proxy integration tests (not a test file itself): the directory the
 * tests route with.
 */
import { existsSync } from 'node:fs';
import { dirname, join as joinPath } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { Directory, PairRecord, UserRecord } from '../../directory/types.ts';
import { AuthError, NotFoundError, UnavailableError } from '../../common/errors.ts';
import type { Logger } from '../../common/log.ts';

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
