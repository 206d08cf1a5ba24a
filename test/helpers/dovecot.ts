/**
 * A private Dovecot (IMAP, POP3, LMTP) on ephemeral loopback ports: the reference backend the
 * proxy is tested against and the baseline the store's benchmarks measure. Users come from a
 * passwd-file; a master user logs in on a user's behalf with SASL PLAIN (authzid = user), as
 * pairgate's proxies do; `trustedNetworks` lets the proxy forward the client address (IMAP ID,
 * POP3 XCLIENT), and `haproxy: true` makes every listener expect a PROXY header.
 */
import { execFileSync } from 'node:child_process';
import { chmodSync, chownSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { startProcess, tempDir, type Managed } from './proc.ts';
import { freePort, waitForPort } from './net.ts';
import { makeTestCert, type TestCert } from './tls.ts';

export interface DovecotUser {
  user: string;
  password: string;
}

export interface DovecotOptions {
  users: DovecotUser[];
  masterUser?: string;
  masterPassword?: string;
  /** login_trusted_networks: who may forward client addresses (default 127.0.0.0/8). */
  trustedNetworks?: string;
  /** Listeners require a PROXY v1/v2 header from haproxyTrustedNetworks. */
  haproxy?: boolean;
  haproxyTrustedNetworks?: string;
  /** Adds TLS (STARTTLS and imaps/pop3s listeners) with a throwaway certificate. */
  tls?: boolean;
  /** mail_fsync setting; Dovecot's default is `optimized`. */
  fsync?: 'optimized' | 'always' | 'never';
}

export interface Dovecot {
  host: string;
  imapPort: number;
  pop3Port: number;
  lmtpPort: number;
  imapsPort?: number;
  pop3sPort?: number;
  cert?: TestCert;
  dir: string;
  proc: Managed;
  /** Messages in a user's INBOX (new and cur), oldest first. */
  messages(user: string): Buffer[];
  log(): string;
  stop(): Promise<void>;
  start(): Promise<void>;
  close(): Promise<void>;
}

function mailOwner(): { uid: number; gid: number; name: string } {
  // Dovecot refuses to run mail processes as root; the packaged `dovecot` account owns the mail.
  const uid = Number(execFileSync('id', ['-u', 'dovecot']).toString().trim());
  const gid = Number(execFileSync('id', ['-g', 'dovecot']).toString().trim());
  return { uid, gid, name: 'dovecot' };
}

export async function startDovecot(opts: DovecotOptions): Promise<Dovecot> {
  const tmp = tempDir('pairgate-dovecot-');
  const dir = tmp.path;
  chmodSync(dir, 0o755);
  const owner = mailOwner();
  const mailRoot = join(dir, 'mail');
  mkdirSync(mailRoot);
  chownSync(mailRoot, owner.uid, owner.gid);
  const host = '127.0.0.1';
  const [imapPort, pop3Port, lmtpPort] = [await freePort(), await freePort(), await freePort()];
  const cert = opts.tls ? makeTestCert(dir, 'dovecot') : undefined;
  const imapsPort = cert ? await freePort() : undefined;
  const pop3sPort = cert ? await freePort() : undefined;

  writeFileSync(
    join(dir, 'users'),
    opts.users.map((u) => `${u.user}:{PLAIN}${u.password}:${owner.uid}:${owner.gid}::${join(mailRoot, u.user)}::\n`).join(''),
  );
  writeFileSync(join(dir, 'masters'), opts.masterUser ? `${opts.masterUser}:{PLAIN}${opts.masterPassword ?? ''}\n` : '');
  const haproxy = opts.haproxy ? '    haproxy = yes\n' : '';
  const conf = `
base_dir = ${dir}/run
state_dir = ${dir}/state
instance_name = pairgate-test-${imapPort}
log_path = ${dir}/dovecot.log
info_log_path = ${dir}/dovecot.log
protocols = imap pop3 lmtp
listen = ${host}
ssl = ${cert ? 'yes' : 'no'}
${cert ? `ssl_cert = <${cert.certFile}\nssl_key = <${cert.keyFile}\n` : ''}
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_username_format = %Ln
login_trusted_networks = ${opts.trustedNetworks ?? '127.0.0.0/8'}
haproxy_trusted_networks = ${opts.haproxyTrustedNetworks ?? '127.0.0.0/8'}
mail_location = maildir:~/Maildir
mail_fsync = ${opts.fsync ?? 'optimized'}
first_valid_uid = ${owner.uid}
default_internal_user = dovecot
default_login_user = dovenull
pop3_uidl_format = %08Xu%08Xv
lmtp_save_to_detail_mailbox = no
mail_max_userip_connections = 1000
verbose_proctitle = no
auth_verbose = yes
passdb {
  driver = passwd-file
  master = yes
  args = ${dir}/masters
  pass = yes
}
passdb {
  driver = passwd-file
  args = ${dir}/users
}
userdb {
  driver = passwd-file
  args = ${dir}/users
}
service imap-login {
  inet_listener imap {
    port = ${imapPort}
${haproxy}  }
  inet_listener imaps {
    port = ${imapsPort ?? 0}
${cert ? '    ssl = yes\n' : ''}${haproxy}  }
  process_min_avail = 1
}
service pop3-login {
  inet_listener pop3 {
    port = ${pop3Port}
${haproxy}  }
  inet_listener pop3s {
    port = ${pop3sPort ?? 0}
${cert ? '    ssl = yes\n' : ''}${haproxy}  }
}
service lmtp {
  inet_listener lmtp {
    address = ${host}
    port = ${lmtpPort}
${haproxy}  }
  unix_listener lmtp {
    mode = 0600
  }
}
service auth {
  unix_listener auth-userdb {
    mode = 0666
  }
}
service stats {
  unix_listener stats-reader {
    mode = 0666
  }
  unix_listener stats-writer {
    mode = 0666
  }
}
`;
  const confFile = join(dir, 'dovecot.conf');
  writeFileSync(confFile, conf);
  const launch = async () => {
    // -F: foreground, so that the test owns the master process and its children die with it.
    const proc = startProcess('dovecot', '/usr/sbin/dovecot', ['-F', '-c', confFile]);
    const fail = (err: Error) => {
      const log = existsSync(join(dir, 'dovecot.log')) ? readFileSync(join(dir, 'dovecot.log'), 'utf8') : '';
      throw new Error(`${err.message}\n${proc.output()}\n${log}`);
    };
    for (const port of [imapPort, pop3Port, lmtpPort]) await waitForPort(host, port, 15_000, proc.alive).catch(fail);
    return proc;
  };
  const readInbox = (user: string): Buffer[] => {
    const base = join(mailRoot, user, 'Maildir');
    const files: Array<{ path: string; name: string }> = [];
    for (const sub of ['new', 'cur']) {
      const d = join(base, sub);
      if (!existsSync(d)) continue;
      for (const name of readdirSync(d)) files.push({ path: join(d, name), name });
    }
    // Maildir names start with the delivery time in seconds and a sequence: sort for arrival order.
    files.sort((a, b) => a.name.localeCompare(b.name, 'en', { numeric: true }));
    return files.map((f) => readFileSync(f.path));
  };
  const dovecot: Dovecot = {
    host,
    imapPort,
    pop3Port,
    lmtpPort,
    ...(imapsPort ? { imapsPort } : {}),
    ...(pop3sPort ? { pop3sPort } : {}),
    ...(cert ? { cert } : {}),
    dir,
    proc: await launch(),
    messages: readInbox,
    log: () => (existsSync(join(dir, 'dovecot.log')) ? readFileSync(join(dir, 'dovecot.log'), 'utf8') : ''),
    stop: () => dovecot.proc.stop(5000),
    start: async () => {
      dovecot.proc = await launch();
    },
    close: async () => {
      await dovecot.proc.stop(5000);
      tmp.cleanup();
    },
  };
  return dovecot;
}
