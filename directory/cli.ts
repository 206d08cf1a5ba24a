/**
 * `pairgate directory …`: the directory from the command line, against either backend.
 *   lookup <login|address>     uid, DN, addresses, home pair and its address
 *   auth <login>               checks a password (first line of stdin, or --password-env NAME)
 *   pairs                      the pairs with state, weight, address, ports and users
 *   add-user <uid> --mail A --password-env NAME [--alias A]... [--pair ID] [--quota BYTES]
 *   generate --users N --pairs M [--seed S] [--out FILE]    a realistic LDIF
 *   import FILE                adds the entries of an LDIF file to LDAP (existing ones skipped)
 * Backend: --config FILE (a directory section, or a proxy config with `directory:`), --ldif FILE,
 * or --url URL [--url URL2] --base-dn DN [--bind-dn DN --bind-password-env NAME] [--start-tls] [--ca FILE].
 */
import { createWriteStream, readFileSync } from 'node:fs';
import { once } from 'node:events';
import cliProgress from 'cli-progress';
import Table from 'cli-table3';
import type { Command } from 'commander';
import { Client, ResultCodeError } from 'ldapts';
import { parseYaml, validateConfig } from '../common/config.ts';
import { AuthError, BadInputError, ConfigError, NotFoundError, PairgateError, UnavailableError } from '../common/errors.ts';
import { createLogger, silentLogger } from '../common/log.ts';
import { directoryConfigSchema, type DirectoryConfig } from './config.ts';
import { generateLdif } from './generate.ts';
import { openDirectory } from './index.ts';
import { LdifBackend } from './ldif-backend.ts';
import { parseLdif } from './ldif.ts';
import { formatPorts } from './records.ts';
import type { Directory } from './types.ts';

interface BackendOpts {
  config?: string;
  ldif?: string;
  url?: string[];
  bindDn?: string;
  bindPasswordEnv?: string;
  baseDn?: string;
  startTls?: boolean;
  ca?: string;
}

function env(name: string, what: string): string {
  const v = process.env[name];
  if (v === undefined) throw new BadInputError(`${what}: environment variable ${name} is not set`);
  return v;
}

export function backendConfig(o: BackendOpts): DirectoryConfig {
  const given = [o.config, o.ldif, o.url?.length ? 'url' : undefined].filter(Boolean).length;
  if (given !== 1) throw new BadInputError('give exactly one of --config FILE, --ldif FILE or --url URL');
  if (o.config) {
    let text: string;
    try {
      text = readFileSync(o.config, 'utf8');
    } catch (err) {
      throw new ConfigError('', `cannot read config file ${o.config}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
    }
    const raw = parseYaml(text, o.config) as Record<string, unknown> | null;
    const section = raw && typeof raw === 'object' && 'directory' in raw ? raw.directory : raw;
    return validateConfig(directoryConfigSchema, section, o.config);
  }
  if (o.ldif) return validateConfig(directoryConfigSchema, { ldif: o.ldif, watch: false }, '--ldif');
  if (!o.baseDn) throw new BadInputError('--url needs --base-dn');
  return validateConfig(
    directoryConfigSchema,
    {
      urls: o.url,
      baseDn: o.baseDn,
      ...(o.bindDn ? { bindDn: o.bindDn, bindPassword: env(o.bindPasswordEnv ?? 'PAIRGATE_LDAP_PASSWORD', '--bind-dn') } : {}),
      ...(o.startTls ? { startTls: true } : {}),
      ...(o.ca ? { tls: { ca: o.ca } } : {}),
    },
    'command line',
  );
}

function withBackend(cmd: Command): Command {
  return cmd
    .option('--config <file>', 'YAML with a directory section (or a proxy config with directory:)')
    .option('--ldif <file>', 'the embedded LDIF directory file')
    .option('--url <url>', 'LDAP server URL (repeat for replicas)', (v: string, prev: string[] = []) => [...prev, v])
    .option('--bind-dn <dn>', 'service account DN')
    .option('--bind-password-env <name>', 'environment variable holding the bind password', 'PAIRGATE_LDAP_PASSWORD')
    .option('--base-dn <dn>', 'directory base DN (with --url)')
    .option('--start-tls', 'StartTLS on ldap:// URLs')
    .option('--ca <file>', 'CA certificate (PEM) for LDAPS/StartTLS');
}

async function withDirectory<T>(o: BackendOpts, fn: (d: Directory) => Promise<T>): Promise<T> {
  const config = backendConfig(o);
  const log = createLogger({ role: 'directory-cli', level: process.env.PAIRGATE_LOG_LEVEL ?? 'error' });
  const d = await openDirectory({ ...config, cache: { ...config.cache, maxEntries: 0 } }, { log });
  try {
    return await fn(d);
  } finally {
    await d.close();
  }
}

const out = (line: string) => process.stdout.write(`${line}\n`);

async function readStdinLine(): Promise<string> {
  if (process.stdin.isTTY) process.stderr.write('password: ');
  const chunks: Buffer[] = [];
  for await (const c of process.stdin) {
    chunks.push(c as Buffer);
    if (Buffer.concat(chunks).includes(10)) break;
  }
  return Buffer.concat(chunks).toString('utf8').split(/\r?\n/)[0] ?? '';
}

function positiveInt(name: string) {
  return (v: string) => {
    if (!/^\d+$/.test(v)) throw new BadInputError(`${name} must be a whole number, got ${JSON.stringify(v)}`);
    return Number(v);
  };
}

function table(head: string[]): Table.Table {
  return new Table(process.stdout.isTTY ? { head } : { head, style: { head: [], border: [] } });
}

export function register(program: Command): void {
  const dir = program.command('directory').description('the user and pair directory (LDAP or the embedded LDIF file)');

  withBackend(dir.command('lookup').description('show a user: uid, DN, addresses, home pair').argument('<login>', 'uid or any address')).action(
    async (login: string, o: BackendOpts) => {
      await withDirectory(o, async (d) => {
        const user = await d.findLogin(login);
        if (!user) throw new NotFoundError(`no user ${login}`);
        out(`uid:      ${user.uid}`);
        out(`dn:       ${user.dn}`);
        out(`mail:     ${user.mail}`);
        out(`aliases:  ${user.aliases.join(', ') || '-'}`);
        if (user.quotaBytes !== undefined) out(`quota:    ${user.quotaBytes} bytes`);
        try {
          const { pair } = await d.routeFor(user);
          out(`pair:     ${pair.id} (${pair.state}, weight ${pair.weight})`);
          out(`address:  ${pair.address}${Object.keys(pair.ports).length ? ` ports ${formatPorts(pair.ports)}` : ''}`);
        } catch (err) {
          if (!(err instanceof NotFoundError)) throw err;
          out(`pair:     ${user.pair || '-'} (${err.message})`);
          process.exitCode = 1;
        }
      });
    },
  );

  withBackend(dir.command('auth').description('check a password (stdin, or --password-env)').argument('<login>', 'uid or any address'))
    .option('--password-env <name>', 'environment variable holding the password')
    .action(async (login: string, o: BackendOpts & { passwordEnv?: string }) => {
      const password = o.passwordEnv ? env(o.passwordEnv, '--password-env') : await readStdinLine();
      await withDirectory(o, async (d) => {
        try {
          const user = await d.authenticate(login, password);
          out(`ok: ${user.uid} (${user.dn}), home pair ${user.pair}`);
        } catch (err) {
          if (!(err instanceof AuthError)) throw err;
          out(`refused: ${err.message}`);
          process.exitCode = 1;
        }
      });
    });

  withBackend(dir.command('pairs').description('list the pairs with state, weight and users')).action(async (o: BackendOpts) => {
    await withDirectory(o, async (d) => {
      const pairs = await d.listPairs();
      let next = '-';
      try {
        next = (await d.placeNewUser()).id;
      } catch (err) {
        if (!(err instanceof PairgateError)) throw err;
      }
      let counts: Map<string, number> | null = null;
      try {
        counts = (await d.usersPerPair?.()) ?? null;
      } catch (err) {
        if (!(err instanceof PairgateError)) throw err;
        process.stderr.write(`users per pair unknown: ${err.message}\n`);
      }
      const t = table(['pair', 'state', 'weight', 'users', 'free', 'address', 'ports']);
      for (const p of pairs) {
        const n = counts?.get(p.id) ?? 0;
        t.push([p.id, p.state, String(p.weight), counts ? String(n) : '?', counts ? String(p.weight - n) : '?', p.address, formatPorts(p.ports) || '-']);
      }
      out(t.toString());
      out(`${pairs.length} pair(s); a new user would be placed on ${next}`);
    });
  });

  withBackend(dir.command('add-user').description('add a user (placed on the pair with the most free capacity unless --pair)').argument('<uid>'))
    .requiredOption('--mail <address>', 'primary address')
    .requiredOption('--password-env <name>', 'environment variable holding the password')
    .option('--alias <address>', 'further address (repeatable)', (v: string, prev: string[] = []) => [...prev, v])
    .option('--pair <id>', 'home pair (default: placement)')
    .option('--cn <name>', 'full name')
    .option('--quota <bytes>', 'mailbox quota in bytes', positiveInt('--quota'))
    .action(async (uid: string, o: BackendOpts & { mail: string; passwordEnv: string; alias?: string[]; pair?: string; cn?: string; quota?: number }) => {
      const password = env(o.passwordEnv, '--password-env');
      await withDirectory(o, async (d) => {
        const u = await d.addUser({
          uid,
          password,
          mail: o.mail,
          ...(o.alias ? { aliases: o.alias } : {}),
          ...(o.pair ? { pair: o.pair } : {}),
          ...(o.cn ? { cn: o.cn } : {}),
          ...(o.quota !== undefined ? { quotaBytes: o.quota } : {}),
        });
        out(`added ${u.uid} (${u.dn}) on ${u.pair}`);
      });
    });

  dir
    .command('generate')
    .description('write a realistic directory as LDIF (users with aliases, pairs with weights and states)')
    .requiredOption('--users <n>', 'number of users', positiveInt('--users'))
    .requiredOption('--pairs <m>', 'number of pairs', positiveInt('--pairs'))
    .option('--seed <s>', 'random seed (same seed, same output)', positiveInt('--seed'), 1)
    .option('--base-dn <dn>', 'suffix', 'dc=pairgate,dc=test')
    .option('--domain <domain>', 'mail domain (repeatable)', (v: string, prev: string[] = []) => [...prev, v])
    .option('--password-template <t>', 'user password; {uid} is replaced', '{uid}-pass')
    .option('--no-base', 'leave out the suffix, ou=people, ou=pairs and the service account')
    .option('--out <file>', 'write here instead of stdout')
    .action(async (o: { users: number; pairs: number; seed: number; baseDn: string; domain?: string[]; passwordTemplate: string; base: boolean; out?: string }) => {
      if (o.pairs < 1) throw new BadInputError('--pairs must be at least 1');
      const stream = o.out ? createWriteStream(o.out) : process.stdout;
      for (const chunk of generateLdif({ users: o.users, pairs: o.pairs, seed: o.seed, baseDn: o.baseDn, domains: o.domain ?? [], passwordTemplate: o.passwordTemplate, base: o.base })) {
        if (!stream.write(chunk)) await once(stream, 'drain');
      }
      if (o.out) {
        (stream as ReturnType<typeof createWriteStream>).end();
        await once(stream, 'finish');
        process.stderr.write(`wrote ${o.users} users and ${o.pairs} pairs to ${o.out}\n`);
      }
    });

  withBackend(dir.command('import').description('add the entries of an LDIF file to LDAP or to the embedded LDIF directory (existing entries skipped)').argument('<file>'))
    .option('--concurrency <n>', 'adds in flight', positiveInt('--concurrency'), 8)
    .action(async (file: string, o: BackendOpts & { concurrency: number }) => {
      const c = backendConfig(o);
      let text: string;
      try {
        text = readFileSync(file, 'utf8');
      } catch (err) {
        throw new BadInputError(`cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
      }
      const entries = parseLdif(text, file).flatMap((r) => (r.entry ? [r.entry] : []));
      if (c.ldif) {
        // The embedded directory: one atomic rewrite of its file (a running proxy reloads it).
        const backend = await LdifBackend.open({ file: c.ldif, usersDn: c.usersDn, watch: false, log: silentLogger });
        try {
          const r = await backend.importEntries(entries);
          out(`imported ${r.added} entries into ${c.ldif}, ${r.skipped} already there`);
        } finally {
          await backend.close();
        }
        return;
      }
      const urls = c.urls!;
      const client = new Client({
        url: urls[0]!,
        timeout: c.timeoutMs ?? 10_000,
        connectTimeout: c.connectTimeoutMs ?? 3_000,
        ...(urls[0]!.startsWith('ldaps') && c.tls?.ca ? { tlsOptions: { ca: readFileSync(c.tls.ca) } } : {}),
      });
      const bar = new cliProgress.SingleBar({ format: 'import [{bar}] {value}/{total} entries, {skipped} skipped, {eta}s left', stream: process.stderr, noTTYOutput: true, notTTYSchedule: 2000 }, cliProgress.Presets.legacy);
      let added = 0;
      let skipped = 0;
      try {
        if (c.startTls) await client.startTLS(c.tls?.ca ? { ca: readFileSync(c.tls.ca) } : {});
        if (c.bindDn) await client.bind(c.bindDn, c.bindPassword ?? '');
        bar.start(entries.length, 0, { skipped: 0 });
        let i = 0;
        const worker = async () => {
          while (i < entries.length) {
            const e = entries[i++]!;
            const attrs: Record<string, string[]> = {};
            for (const [n, v] of e.attrs) (attrs[n] ??= []).push(v);
            try {
              await client.add(e.dn, attrs);
              added++;
            } catch (err) {
              if (err instanceof ResultCodeError && err.code === 68) skipped++;
              else throw new PairgateError('CONFLICT', `${e.dn}: ${(err as Error).message}`, false, { cause: err });
            }
            bar.increment(1, { skipped });
          }
        };
        await Promise.all(Array.from({ length: Math.max(1, o.concurrency) }, worker));
      } catch (err) {
        if (err instanceof PairgateError) throw err;
        throw new UnavailableError(`LDAP ${urls[0]}: ${(err as Error).message}`, { cause: err });
      } finally {
        bar.stop();
        await client.unbind().catch(() => undefined);
      }
      out(`imported ${added} entries into ${urls[0]}, ${skipped} already there`);
    });

}
