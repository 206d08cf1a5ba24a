/** The embedded LDIF directory: the behavioural suite, plus file watching and atomic writes. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { appendFileSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { silentLogger } from '../../common/log.ts';
import { openDirectory } from '../../directory/index.ts';
import type { Directory } from '../../directory/types.ts';
import { tempDir } from '../helpers/proc.ts';
import { waitFor } from '../helpers/net.ts';
import { behaviouralSuite, suiteLdif, userEntry, type SuiteContext } from './directory-suite.ts';

const NEGATIVE_TTL = 60_000;
let tmp: ReturnType<typeof tempDir>;
let file: string;
let ctx: SuiteContext;

beforeAll(async () => {
  tmp = tempDir('pairgate-dir-ldif-');
  file = join(tmp.path, 'directory.ldif');
  writeFileSync(file, suiteLdif());
  const config = { ldif: file, watch: false, cache: { negativeTtlMs: NEGATIVE_TTL } };
  ctx = {
    directory: await openDirectory(config, { log: silentLogger }),
    addBehindBack: async (uid, mail, pair) => appendFileSync(file, `\n${userEntry(uid, mail, pair)}`),
    openAnother: () => openDirectory(config, { log: silentLogger }),
    negativeTtlMs: NEGATIVE_TTL,
  };
});

afterAll(async () => {
  await ctx?.directory.close();
  tmp?.cleanup();
});

behaviouralSuite('LDIF file', () => ctx);

describe('LDIF file specifics', () => {
  let d: Directory;
  let dir: ReturnType<typeof tempDir>;
  let f: string;
  beforeAll(async () => {
    dir = tempDir('pairgate-dir-ldif-watch-');
    f = join(dir.path, 'dir.ldif');
    writeFileSync(f, `# top comment\n\n${suiteLdif()}\n# closing comment\n`);
    d = await openDirectory({ ldif: f }, { log: silentLogger });
  });
  afterAll(async () => {
    await d?.close();
    dir?.cleanup();
  });

  it('sees a change of the file (reload on change), including cached answers', async () => {
    expect((await d.findLogin('bob'))?.pair).toBe('pair-02');
    expect(await d.findLogin('henry')).toBeNull();
    const text = readFileSync(f, 'utf8').replace(/mailHost: pair-02/, 'mailHost: pair-01');
    writeFileSync(f, `${text}\n${userEntry('henry', 'henry@example.net', 'pair-02')}`);
    await waitFor(async () => (await d.findLogin('bob'))?.pair === 'pair-01', 5000, 'bob moved by a file edit');
    await waitFor(async () => (await d.findLogin('henry')) !== null, 5000, 'henry added by a file edit');
  });

  it('sees a pair change in the file at once (the pair list is re-read after a reload)', async () => {
    expect((await d.getPair('pair-02'))?.weight).toBe(300);
    writeFileSync(f, readFileSync(f, 'utf8').replace('pairgateWeight: 300', 'pairgateWeight: 50'));
    await waitFor(async () => (await d.getPair('pair-02'))?.weight === 50, 5000, 'new weight of pair-02');
  });

  it('keeps the previous contents when the file does not parse', async () => {
    const good = readFileSync(f, 'utf8');
    writeFileSync(f, `${good}\ndn: uid=broken,ou=people,dc=pairgate,dc=test\nthis line is not LDIF\n`);
    await new Promise((r) => setTimeout(r, 400));
    expect((await d.findLogin('alice'))?.uid).toBe('alice');
    writeFileSync(f, good);
  });

  it('writes changes atomically and keeps comments of other entries', async () => {
    await d.setUserPair('alice', 'pair-02');
    await d.addUser({ uid: 'ivan', password: 'ivan-pass', mail: 'ivan@example.net', pair: 'pair-01' });
    const text = readFileSync(f, 'utf8');
    expect(text.startsWith('# top comment\n')).toBe(true);
    expect(text).toContain('# the service account\n');
    expect(text).toContain('# closing comment');
    expect(text).toMatch(/dn: uid=alice,ou=people,dc=pairgate,dc=test[\s\S]*?mailHost: pair-02/);
    expect(text).toMatch(/dn: uid=ivan,ou=people,dc=pairgate,dc=test\n/);
    expect(text).toMatch(/userPassword: \{SSHA512\}/);
    expect(readdirSync(dir.path).filter((n) => n.endsWith('.tmp'))).toEqual([]);
    // A fresh reader of the file sees the same.
    const other = await openDirectory({ ldif: f, watch: false }, { log: silentLogger });
    try {
      expect((await other.authenticate('ivan', 'ivan-pass')).pair).toBe('pair-01');
      expect((await other.findLogin('alice'))?.pair).toBe('pair-02');
    } finally {
      await other.close();
    }
  });

  it('refuses a bad config with a ConfigError naming the key', async () => {
    await expect(openDirectory({}, { log: silentLogger })).rejects.toThrow(/urls/);
    await expect(openDirectory({ ldif: f, urls: ['ldap://127.0.0.1:1'] }, { log: silentLogger })).rejects.toThrow(/either ldif/);
    await expect(openDirectory({ urls: ['ldap://127.0.0.1:1'] }, { log: silentLogger })).rejects.toThrow(/baseDn/);
    await expect(openDirectory({ ldif: f, bogus: 1 }, { log: silentLogger })).rejects.toThrow(/bogus: unknown key/);
    await expect(openDirectory({ urls: ['ldap://127.0.0.1:1'], baseDn: 'dc=x', bindDn: 'cn=x', bindPassword: '' }, { log: silentLogger })).rejects.toThrow(/bindPassword: must not be empty/);
    await expect(openDirectory({ urls: ['ldap://127.0.0.1:1'], baseDn: 'dc=x', bindDn: 'cn=x', bindPassword: '${PG_UNSET_TEST_VAR}' }, { log: silentLogger })).rejects.toThrow(/PG_UNSET_TEST_VAR is not set/);
    await expect(openDirectory({ ldif: join(dir.path, 'missing.ldif') }, { log: silentLogger })).rejects.toThrow(/cannot read/);
  });
});
