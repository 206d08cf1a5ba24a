/** `pairgate directory …` run as a process: lookup, auth, generate, import into slapd, add-user, bad arguments. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseLdifEntries, attrValue } from '../../directory/ldif.ts';
import { tempDir } from '../helpers/proc.ts';
import { startSlapd, SAMPLE_LDIF, type Slapd } from '../helpers/slapd.ts';

const CLI = fileURLToPath(new URL('../../bin/pairgate.mjs', import.meta.url));

function run(args: string[], opts: { input?: string; env?: Record<string, string> } = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = execFile(process.execPath, [CLI, 'directory', ...args], { env: { ...process.env, ...opts.env }, timeout: 30_000 }, (err, stdout, stderr) => {
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr });
    });
    child.stdin?.end(opts.input ?? '');
  });
}

const tmp = tempDir('pairgate-dir-cli-');
let slapd: Slapd;

beforeAll(async () => {
  slapd = await startSlapd();
}, 30_000);

afterAll(async () => {
  await slapd?.close();
  tmp.cleanup();
});

describe('pairgate directory (CLI)', () => {
  it('lookup answers with the pair (LDIF file)', async () => {
    const r = await run(['lookup', 'alice@example.net', '--ldif', SAMPLE_LDIF]);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/uid:\s+alice/);
    expect(r.stdout).toMatch(/pair:\s+pair-01 \(active, weight 100\)/);
    expect(r.stdout).toMatch(/address:\s+127\.0\.1\.1/);
    const none = await run(['lookup', '*)(uid=*', '--ldif', SAMPLE_LDIF]);
    expect(none.code).toBe(1);
    expect(none.stderr).toMatch(/NOT_FOUND: no user/);
  });

  it('lookup with --config: a proxy config whose directory section names the password by environment', async () => {
    const cfg = join(tmp.path, 'proxy.yaml');
    const { writeFileSync } = await import('node:fs');
    writeFileSync(cfg, `directory:\n  urls: ["${slapd.url}"]\n  baseDn: ${slapd.suffix}\n  bindDn: cn=pairgate,ou=services,${slapd.suffix}\n  bindPassword: \${SVC_PW}\nlisteners: []\n`);
    const r = await run(['lookup', 'robert@example.net', '--config', cfg], { env: { SVC_PW: 'service-pass' } });
    expect(r.stdout).toMatch(/uid:\s+bob/);
    expect(r.stdout).toMatch(/pair:\s+pair-02/);
    const missing = await run(['lookup', 'bob', '--config', cfg]);
    expect(missing.code).toBe(2);
    expect(missing.stderr).toMatch(/bindPassword: environment variable SVC_PW is not set/);
  });

  it('auth reads the password from stdin (LDAP)', async () => {
    const base = ['--url', slapd.url, '--base-dn', slapd.suffix, '--bind-dn', `cn=pairgate,ou=services,${slapd.suffix}`];
    const env = { PAIRGATE_LDAP_PASSWORD: 'service-pass' };
    const ok = await run(['auth', 'bob', ...base], { input: 'bob-pass\n', env });
    expect(ok.stdout).toMatch(/^ok: bob/);
    expect(ok.code).toBe(0);
    const bad = await run(['auth', 'bob', ...base], { input: 'nope\n', env });
    expect(bad.code).toBe(1);
    expect(bad.stdout).toMatch(/refused/);
  });

  it('generate is deterministic and realistic; import loads it into slapd with a progress bar', async () => {
    const file = join(tmp.path, 'gen.ldif');
    const [a, b] = await Promise.all([
      run(['generate', '--users', '300', '--pairs', '6', '--seed', '42', '--no-base', '--out', file]),
      run(['generate', '--users', '300', '--pairs', '6', '--seed', '42', '--no-base']),
    ]);
    expect(a.code).toBe(0);
    expect(b.stdout).toBe(readFileSync(file, 'utf8'));
    const entries = parseLdifEntries(b.stdout);
    const pairs = entries.filter((e) => attrValue(e, 'objectClass') === 'pairgatePair');
    const users = entries.filter((e) => attrValue(e, 'uid'));
    expect(pairs.map((p) => attrValue(p, 'pairgateState'))).toEqual(['active', 'active', 'active', 'active', 'draining', 'retired']);
    expect(users).toHaveLength(300);
    expect(users.some((u) => u.attrs.some(([n]) => n === 'mailLocalAddress'))).toBe(true);
    expect(users.every((u) => attrValue(u, 'mailHost') !== 'pair-06')).toBe(true);
    // Pair ids pair-01.. collide with the sample's: import skips them and adds the rest.
    const imp = await run(['import', file, '--url', slapd.url, '--base-dn', slapd.suffix, '--bind-dn', slapd.adminDn], { env: { PAIRGATE_LDAP_PASSWORD: slapd.adminPassword } });
    expect(imp.stderr).toMatch(/import \[/);
    expect(imp.stdout).toMatch(/imported 304 entries into .*, 2 already there/);
    expect(imp.code).toBe(0);
    const uid = attrValue(users[7]!, 'uid')!;
    const look = await run(['lookup', attrValue(users[7]!, 'mail')!, '--url', slapd.url, '--base-dn', slapd.suffix, '--bind-dn', slapd.adminDn], { env: { PAIRGATE_LDAP_PASSWORD: slapd.adminPassword } });
    expect(look.stdout).toMatch(new RegExp(`uid:\\s+${uid.replace('.', '\\.')}`));
    const ok = await run(['auth', uid, '--url', slapd.url, '--base-dn', slapd.suffix, '--bind-dn', slapd.adminDn, '--password-env', 'P'], { env: { PAIRGATE_LDAP_PASSWORD: slapd.adminPassword, P: `${uid}-pass` } });
    expect(ok.stdout).toMatch(/^ok: /);
    // The same import into the embedded LDIF directory (a copy of the sample).
    const dirFile = join(tmp.path, 'embedded.ldif');
    copyFileSync(SAMPLE_LDIF, dirFile);
    const li = await run(['import', file, '--ldif', dirFile]);
    expect(li.stdout).toMatch(/imported 304 entries into .*, 2 already there/);
    expect(li.code).toBe(0);
    const look2 = await run(['lookup', attrValue(users[7]!, 'mail')!, '--ldif', dirFile]);
    expect(look2.stdout).toMatch(new RegExp(`uid:\\s+${uid.replace('.', '\\.')}`));
    expect((await run(['auth', uid, '--ldif', dirFile, '--password-env', 'P'], { env: { P: `${uid}-pass` } })).stdout).toMatch(/^ok: /);
    expect((await run(['lookup', 'alice', '--ldif', dirFile])).stdout).toMatch(/pair:\s+pair-01/); // the sample's own entries stay
    const again = await run(['import', file, '--ldif', dirFile]);
    expect(again.stdout).toMatch(/imported 0 entries into .*, 306 already there/);
    // A new DN that reuses a uid (or address) of the file is refused whole, naming it.
    const clash = join(tmp.path, 'clash.ldif');
    writeFileSync(clash, 'dn: uid=alice2,ou=people,dc=pairgate,dc=test\nobjectClass: inetOrgPerson\nobjectClass: inetLocalMailRecipient\nuid: alice2\ncn: A\nsn: A\nmail: alice@example.net\nmailHost: pair-01\n');
    const before = readFileSync(dirFile, 'utf8');
    const bad = await run(['import', clash, '--ldif', dirFile]);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/uid=alice2.*address alice@example\.net already belongs/);
    expect(readFileSync(dirFile, 'utf8')).toBe(before);
  }, 90_000);

  it('add-user places the user and pairs lists the pairs', async () => {
    const file = join(tmp.path, 'small.ldif');
    await run(['generate', '--users', '10', '--pairs', '2', '--out', file]);
    const add = await run(['add-user', 'newbie', '--mail', 'newbie@example.net', '--password-env', 'NP', '--alias', 'nb@example.net', '--ldif', file], { env: { NP: 'newbie-pass' } });
    expect(add.stdout).toMatch(/^added newbie \(uid=newbie,ou=people,dc=pairgate,dc=test\) on pair-0[12]/);
    const pairs = await run(['pairs', '--ldif', file]);
    expect(pairs.stdout).toMatch(/pair-01/);
    expect(pairs.stdout).toMatch(/2 pair\(s\); a new user would be placed on pair-0[12]/);
    const auth = await run(['auth', 'nb@example.net', '--ldif', file, '--password-env', 'NP'], { env: { NP: 'newbie-pass' } });
    expect(auth.stdout).toMatch(/^ok: newbie/);
  });

  it('bad arguments: one line, exit 2', async () => {
    for (const args of [['lookup', 'alice'], ['generate', '--users', 'many', '--pairs', '2'], ['lookup', 'alice', '--url', 'ldap://127.0.0.1:1'], ['lookup', 'alice', '--ldif', 'x', '--url', 'ldap://h:1']]) {
      const r = await run(args);
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.stderr.trim().split('\n').filter((l) => !/npm warn/.test(l))).toHaveLength(1);
    }
    const cfg = await run(['lookup', 'alice', '--url', 'http://x', '--base-dn', 'dc=x']);
    expect(cfg.code).toBe(2);
    expect(cfg.stderr).toMatch(/urls\[0\]: expected ldap:\/\/host:port/);
  });
});
