/**
 * `pairgate proxy --config FILE` as a real process: the config file (YAML, with an `${ENV}`
 * reference for the master secret), an LDIF directory, a real Dovecot as the pair; SIGHUP
 * re-reads the file and the certificate (a broken file is refused and the old config kept);
 * SIGTERM stops accepting, lets a session finish within the grace time, closes the one left
 * with `* BYE`, and the process exits 0.
 */
import net from 'node:net';
import tls from 'node:tls';
import { copyFileSync, writeFileSync } from 'node:fs';
import { createHash, randomBytes } from 'node:crypto';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDovecot, type Dovecot } from '../helpers/dovecot.ts';
import { makeTestCert, type TestCert } from '../helpers/tls.ts';
import { startProcess, tempDir, type Managed } from '../helpers/proc.ts';
import { freePort, waitFor, waitForPort } from '../helpers/net.ts';
import { haveDirectory, pairAdmin } from './proxy-harness.ts';

const CLI = resolve(dirname(fileURLToPath(import.meta.url)), '../../bin/pairgate.mjs');
const MASTER = 'pgmaster';
const MASTER_SECRET = `m-${randomBytes(6).toString('hex')}`;

function ssha(password: string): string {
  const salt = randomBytes(8);
  return `{SSHA}${Buffer.concat([createHash('sha1').update(password).update(salt).digest(), salt]).toString('base64')}`;
}

/** A line reader over a plain or TLS socket. */
class Lines {
  private buf = '';
  private waiters: Array<() => void> = [];
  ended = false;
  readonly closed: Promise<void>;
  constructor(readonly socket: net.Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => {
      this.buf += d;
      this.wake();
    });
    socket.on('error', () => undefined);
    this.closed = new Promise((r) =>
      socket.once('close', () => {
        this.ended = true;
        this.wake();
        r();
      }),
    );
  }
  private wake() {
    for (const w of this.waiters.splice(0)) w();
  }
  send(line: string) {
    this.socket.write(`${line}\r\n`);
  }
  async until(re: RegExp, timeoutMs = 10_000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const lines = this.buf.split('\r\n');
      const hit = lines.find((l) => re.test(l));
      if (hit !== undefined) {
        this.buf = lines.slice(lines.indexOf(hit) + 1).join('\r\n');
        return hit;
      }
      if (this.ended) throw new Error(`closed while waiting for ${re}; got ${JSON.stringify(this.buf.slice(-300))}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${re}; got ${JSON.stringify(this.buf.slice(-300))}`);
      await new Promise<void>((r) => {
        const t = setTimeout(r, left);
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
  }
}

async function connectTls(port: number): Promise<{ lines: Lines; fingerprint: string }> {
  const s = tls.connect({ host: '127.0.0.1', port, rejectUnauthorized: false, servername: 'localhost' });
  await new Promise<void>((resolve, reject) => {
    s.once('secureConnect', () => resolve());
    s.once('error', reject);
  });
  return { lines: new Lines(s), fingerprint: s.getPeerCertificate().fingerprint256 };
}

async function connectPlain(port: number): Promise<Lines> {
  const s = net.connect({ host: '127.0.0.1', port });
  await new Promise<void>((resolve, reject) => {
    s.once('connect', () => resolve());
    s.once('error', reject);
  });
  return new Lines(s);
}

describe.skipIf(!haveDirectory)('pairgate proxy as a process: config file, SIGHUP reload, SIGTERM graceful stop', () => {
  let dir: { path: string; cleanup(): void };
  let dovecot: Dovecot;
  let admin: Awaited<ReturnType<typeof pairAdmin>>;
  let proc: Managed;
  let certA: TestCert;
  let certB: TestCert;
  const ports = { imap: 0, imaps: 0, admin: 0 };
  const configFile = () => join(dir.path, 'proxy.yaml');
  const writeConfig = (extra = '') =>
    writeFileSync(
      configFile(),
      [
        'id: proxy-cli-test',
        'log: { level: info }',
        `admin: { host: 127.0.0.1, port: ${ports.admin} }`,
        `directory: { ldif: ${join(dir.path, 'directory.ldif')} }`,
        `tls: { cert: ${join(dir.path, 'live.crt')}, key: ${join(dir.path, 'live.key')} }`,
        'listeners:',
        `  - { protocol: imap, host: 127.0.0.1, port: ${ports.imap}, tls: none, name: imap }`,
        `  - { protocol: imap, host: 127.0.0.1, port: ${ports.imaps}, tls: implicit, name: imaps }`,
        'backend: { masterUser: pgmaster, masterSecret: "${PROXY_CLI_TEST_MASTER}", trustedNetworks: [127.0.0.0/8] }',
        'health: { pollIntervalMs: 200 }',
        'stopGraceMs: 4000', // long enough for the finishing session on a loaded machine
        extra,
      ].join('\n'),
    );

  beforeAll(async () => {
    dir = tempDir('pairgate-proxy-cli-');
    certA = makeTestCert(dir.path, 'cert-a');
    certB = makeTestCert(dir.path, 'cert-b');
    copyFileSync(certA.certFile, join(dir.path, 'live.crt'));
    copyFileSync(certA.keyFile, join(dir.path, 'live.key'));
    dovecot = await startDovecot({ users: [{ user: 'alice', password: 'backend-only' }, { user: 'bob', password: 'backend-only' }], masterUser: MASTER, masterPassword: MASTER_SECRET });
    admin = await pairAdmin('pair-01');
    const healthPort = admin.port;
    writeFileSync(
      join(dir.path, 'directory.ldif'),
      [
        'dn: dc=pairgate,dc=test\nobjectClass: dcObject\nobjectClass: organization\ndc: pairgate\no: test\n',
        'dn: ou=people,dc=pairgate,dc=test\nobjectClass: organizationalUnit\nou: people\n',
        'dn: ou=pairs,dc=pairgate,dc=test\nobjectClass: organizationalUnit\nou: pairs\n',
        `dn: cn=pair-01,ou=pairs,dc=pairgate,dc=test\nobjectClass: pairgatePair\ncn: pair-01\npairgateAddress: 127.0.0.1\npairgatePorts: imap=${dovecot.imapPort},pop3=${dovecot.pop3Port},admin=${healthPort}\npairgateState: active\npairgateWeight: 100\n`,
        ...['alice', 'bob'].map(
          (u) =>
            `dn: uid=${u},ou=people,dc=pairgate,dc=test\nobjectClass: inetOrgPerson\nobjectClass: inetLocalMailRecipient\nuid: ${u}\ncn: ${u}\nsn: ${u}\nmail: ${u}@example.net\nmailHost: pair-01\nuserPassword: ${ssha(`${u}-pass`)}\n`,
        ),
      ].join('\n'),
    );
    [ports.imap, ports.imaps, ports.admin] = [await freePort(), await freePort(), await freePort()];
    writeConfig();
    proc = startProcess('pairgate-proxy', process.execPath, [CLI, 'proxy', '--config', configFile()], { env: { ...process.env, PROXY_CLI_TEST_MASTER: MASTER_SECRET } });
    await waitForPort('127.0.0.1', ports.imaps, 30_000, proc.alive);
    await waitFor(async () => (await fetch(`http://127.0.0.1:${ports.admin}/health`).catch(() => null))?.ok, 15_000, 'proxy /health ok');
  }, 60_000);

  afterAll(async () => {
    await proc?.stop(3000);
    await admin?.close();
    await dovecot?.close();
    dir?.cleanup();
  });

  it('serves a session with the master secret from the environment, logged by the pair', async () => {
    const { lines } = await connectTls(ports.imaps);
    await lines.until(/^\* OK/);
    lines.send('a1 LOGIN alice alice-pass');
    expect(await lines.until(/^a1 /, 20_000)).toMatch(/^a1 OK/);
    lines.send('a2 LOGOUT');
    await lines.closed;
    await waitFor(() => /imap-login: Info: Login: user=<alice>/.test(dovecot.log()), 5000, 'login in the pair log');
  });

  it('SIGHUP: a new certificate in the same files is served to new connections; a broken config is refused and the old one kept', async () => {
    const before = await connectTls(ports.imaps);
    before.lines.socket.destroy();
    copyFileSync(certB.certFile, join(dir.path, 'live.crt'));
    copyFileSync(certB.keyFile, join(dir.path, 'live.key'));
    proc.kill('SIGHUP');
    const after = await waitFor(
      async () => {
        const c = await connectTls(ports.imaps);
        c.lines.socket.destroy();
        return c.fingerprint !== before.fingerprint ? c.fingerprint : null;
      },
      10_000,
      'new certificate served',
      200,
    );
    expect(after).not.toBe(before.fingerprint);
    // A config that does not validate: refused whole, logged, the process serves on unchanged.
    writeConfig('limits: { maxConnections: -5 }');
    const logged = proc.output().length;
    proc.kill('SIGHUP');
    await waitFor(() => /config reload refused/.test(proc.output().slice(logged)), 10_000, 'reload refusal logged');
    expect(proc.alive()).toBe(true);
    const still = await connectTls(ports.imaps);
    expect(still.fingerprint).toBe(after);
    await still.lines.until(/^\* OK/);
    still.lines.send('a1 LOGIN bob bob-pass');
    expect(await still.lines.until(/^a1 /, 20_000)).toMatch(/^a1 OK/);
    still.lines.socket.destroy();
    writeConfig();
  });

  it('SIGTERM: stops accepting, a session finishes within the grace time, the one left gets BYE, exit 0', async () => {
    const finisher = await connectPlain(ports.imap);
    await finisher.until(/^\* OK/);
    finisher.send('a1 LOGIN alice alice-pass');
    expect(await finisher.until(/^a1 /, 20_000)).toMatch(/^a1 OK/);
    const lingerer = await connectPlain(ports.imap);
    await lingerer.until(/^\* OK/);
    lingerer.send('b1 LOGIN bob bob-pass');
    expect(await lingerer.until(/^b1 /, 20_000)).toMatch(/^b1 OK/);
    proc.kill('SIGTERM');
    await waitFor(
      async () => {
        try {
          const c = await connectPlain(ports.imap);
          c.socket.destroy();
          return false;
        } catch {
          return true;
        }
      },
      5000,
      'listener closed',
      50,
    );
    finisher.send('a2 SELECT INBOX');
    expect(await finisher.until(/^a2 /)).toMatch(/^a2 OK/);
    finisher.send('a3 LOGOUT');
    expect(await finisher.until(/^a3 /)).toMatch(/^a3 OK/);
    await finisher.closed;
    expect(await lingerer.until(/^\* BYE/, 20_000)).toMatch(/shutting down/i);
    await lingerer.closed;
    expect(await proc.exited).toBe(0);
  });
});
