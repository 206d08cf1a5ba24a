/**
 * The proxy in front of pairgate's own store (pair-agent/store IMAP server on a file-backed
 * volume) instead of Dovecot: master login with authzid, client address forwarded with ID,
 * post-login capabilities from the store, a delivered message read back through the proxy, and
 * the directory served by a real slapd (test/helpers/slapd.ts) instead of the LDIF file.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ImapFlow } from 'imapflow';
import { Attribute, Change, Client } from 'ldapts';
import { startProxy, proxyConfigSchema, type Proxy } from '../../proxy/index.ts';
import { createRegistry } from '../../common/metrics.ts';
import { silentLogger } from '../../common/log.ts';
import type { Directory } from '../../directory/types.ts';
import { haveDirectory, openDirectory, pairAdmin, tableDirectory } from './proxy-harness.ts';
import { startHarness, MASTER, type Harness } from './imap-harness.ts';
import { startPop3Server, type Pop3Server } from '../../pair-agent/store/pop3/server.ts';
import { AddressList } from '../../common/cidr.ts';
import net from 'node:net';
import { startSlapd, BASE_DN, SERVICE_DN, SERVICE_PASSWORD, type Slapd } from '../helpers/slapd.ts';

describe(`proxy -> pairgate store (directory: ${haveDirectory ? 'slapd' : 'in-test table'})`, () => {
  let harness: Harness;
  let slapd: Slapd | undefined;
  let directory: Directory;
  let proxy: Proxy;
  let admin: Awaited<ReturnType<typeof pairAdmin>>;
  let pop3: Pop3Server;

  beforeAll(async () => {
    harness = await startHarness();
    pop3 = await startPop3Server({
      store: harness.store,
      host: '127.0.0.1',
      port: 0,
      masterUser: MASTER.user,
      masterSecret: MASTER.secret,
      trusted: new AddressList(['127.0.0.0/8']),
      log: silentLogger,
      registry: createRegistry({}, false),
    });
    admin = await pairAdmin('pair-01');
    const adminPort = admin.port;
    if (haveDirectory) {
      slapd = await startSlapd();
      // Point the sample directory's pair-01 (alice's and carol's home) at the store on loopback.
      const ldap = new Client({ url: slapd.url });
      await ldap.bind(slapd.adminDn, slapd.adminPassword);
      await ldap.modify(`cn=pair-01,ou=pairs,${BASE_DN}`, [
        new Change({ operation: 'replace', modification: new Attribute({ type: 'pairgateAddress', values: ['127.0.0.1'] }) }),
        new Change({ operation: 'replace', modification: new Attribute({ type: 'pairgatePorts', values: [`imap=${harness.port},pop3=${pop3.port},admin=${adminPort}`] }) }),
      ]);
      await ldap.unbind();
      directory = await openDirectory({ urls: [slapd.url], baseDn: BASE_DN, bindDn: SERVICE_DN, bindPassword: SERVICE_PASSWORD }, { log: silentLogger });
    } else {
      const pair = { id: 'pair-01', dn: `cn=pair-01,ou=pairs,${BASE_DN}`, address: '127.0.0.1', ports: { imap: harness.port, pop3: pop3.port, admin: adminPort }, state: 'active' as const, weight: 100 };
      directory = tableDirectory([{ uid: 'alice', password: 'alice-pass', pair: 'pair-01' }, { uid: 'carol', password: 'carol-pass', pair: 'pair-01' }], [pair]);
    }
    proxy = await startProxy(
      proxyConfigSchema.parse({
        directory: {},
        listeners: [
          { protocol: 'imap', host: '127.0.0.1', port: 0, tls: 'none' },
          { protocol: 'pop3', host: '127.0.0.1', port: 0, tls: 'none' },
        ],
        backend: { masterUser: MASTER.user, masterSecret: MASTER.secret, trustedNetworks: ['127.0.0.0/8'] },
        health: { pollIntervalMs: 200 },
      }),
      { log: silentLogger, registry: createRegistry({}, false), directory },
    );
  });

  afterAll(async () => {
    await proxy?.stop(200);
    await directory?.close();
    await slapd?.close();
    await pop3?.close();
    await harness?.close();
    await admin?.close();
  });

  it('logs in through the proxy with the master login and reads a delivered message', async () => {
    await harness.deliver(['alice'], 'Subject: via store\r\n\r\nhello from the store\r\n');
    const client = new ImapFlow({
      host: '127.0.0.1',
      port: proxy.address('imap')!.port,
      secure: false,
      auth: { user: 'alice', pass: 'alice-pass' },
      logger: false,
      disableAutoIdle: true,
    });
    await client.connect();
    // Post-login capabilities are the store's own (the proxy's pre-login list has no UIDPLUS).
    expect(client.capabilities.has('UIDPLUS')).toBe(true);
    const box = await client.mailboxOpen('INBOX');
    expect(box.exists).toBe(1);
    const msg = await client.fetchOne('1', { source: true });
    expect(msg && msg.source?.toString()).toMatch(/hello from the store/);
    await client.logout();
    // The store saw a master login for alice, with the client address forwarded by ID.
    const login = harness.logs.find((l) => /"user":"alice"/.test(l) && /"master":true/.test(l));
    expect(login).toMatch(/"clientIp":"127\.0\.0\.1","clientPort":"\d+"/);
  });

  it('POP3 through the proxy: XCLIENT and master AUTH PLAIN accepted by the store, RETR returns the message', async () => {
    await harness.deliver(['carol'], 'Subject: pop via store\r\n\r\npop body line\r\n');
    const sock = net.connect({ host: '127.0.0.1', port: proxy.address('pop3')!.port });
    let buf = '';
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => (buf += d));
    const until = async (re: RegExp) => {
      const deadline = Date.now() + 10_000;
      while (!re.test(buf)) {
        if (Date.now() > deadline) throw new Error(`timed out waiting for ${re} in ${JSON.stringify(buf)}`);
        await new Promise((r) => setTimeout(r, 10));
      }
    };
    await until(/^\+OK/);
    sock.write('USER carol\r\nPASS carol-pass\r\n');
    await until(/\+OK\r\n\+OK[^\r]*\r\n/);
    sock.write('STAT\r\nRETR 1\r\nQUIT\r\n');
    await until(/pop body line\r\n\.\r\n\+OK/);
    expect(buf).toMatch(/\+OK 1 \d+/);
    sock.destroy();
  });

  it('a wrong password never reaches the store', async () => {
    const client = new ImapFlow({ host: '127.0.0.1', port: proxy.address('imap')!.port, secure: false, auth: { user: 'carol', pass: 'nope' }, logger: false });
    await expect(client.connect()).rejects.toThrow();
    client.close();
  });
});
