/**
 * `pairgate user move <login> --to <pair> --config <proxy.yaml>`: rebalancing, one user at a
 * time (the sequence is in bin/user-move.ts). It reads a proxy's configuration because a proxy
 * already knows everything a move needs: the directory, Redis, and the pairs' master login.
 */
import type { Command } from 'commander';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { loadConfigFile } from '../common/config.ts';
import { BadInputError, UnavailableError } from '../common/errors.ts';
import { createLogger } from '../common/log.ts';
import { RedisBus } from '../common/redis-bus.ts';
import type { Directory } from '../directory/types.ts';
import { proxyConfigSchema } from '../proxy/config.ts';
import { moveUser } from './user-move.ts';
import { sleep } from './lab/wait.ts';

const here = dirname(fileURLToPath(import.meta.url));

async function waitForRedis(bus: RedisBus, timeoutMs: number): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!bus.connected && Date.now() < until) await sleep(50);
  if (!bus.connected) throw new UnavailableError(`Redis did not answer within ${timeoutMs} ms; a user move needs it to hold the user's sessions`);
}

export function register(program: Command): void {
  const user = program.command('user').description('operate on users (rebalancing)');
  user
    .command('move')
    .description("move a user's mailboxes to another pair: live copy, short hold, delta, switch, cleanup")
    .argument('<login>', 'uid or address of the user')
    .requiredOption('--to <pair>', 'the target pair id, e.g. pair-02')
    .requiredOption('--config <file>', "a proxy's configuration (directory, redis, backend master login)")
    .option('--bind-dn <dn>', "LDAP account allowed to change mailHost (the proxies' own account is read-only)")
    .option('--bind-password-env <var>', 'environment variable holding that account\'s password', 'PAIRGATE_LDAP_PASSWORD')
    .option('--settle <ms>', 'wait for in-flight deliveries after the hold begins', (v) => Number.parseInt(v, 10), 2000)
    .action(async (login: string, o: { to: string; config: string; bindDn?: string; bindPasswordEnv: string; settle: number }) => {
      const config = loadConfigFile(proxyConfigSchema, o.config);
      let directoryConfig: unknown = config.directory;
      if (o.bindDn) {
        const password = process.env[o.bindPasswordEnv];
        if (password === undefined) throw new BadInputError(`--bind-dn needs the password in the environment variable ${o.bindPasswordEnv}`);
        directoryConfig = { ...config.directory, bindDn: o.bindDn, bindPassword: password };
      }
      if (!config.redis) throw new UnavailableError('the proxy configuration has no redis section; a user move needs Redis');
      const log = createLogger({ role: 'user-move', level: 'warn' });
      const bus = new RedisBus({ url: config.redis.url, log });
      const { openDirectory } = (await import(pathToFileURL(join(here, '../directory/index.ts')).href)) as {
        openDirectory(c: unknown, d: { log: typeof log; bus?: RedisBus }): Promise<Directory>;
      };
      let directory: Directory | null = null;
      try {
        await waitForRedis(bus, 3000);
        directory = await openDirectory(directoryConfig, { log, bus });
        const report = await moveUser(login, o.to, {
          directory,
          bus,
          masterUser: config.backend.masterUser,
          masterSecret: config.backend.masterSecret,
          settleMs: o.settle,
          say: (line) => process.stdout.write(`${line}\n`),
        });
        process.stdout.write(
          `moved ${report.uid} from ${report.from} to ${report.to}: ${report.mailboxes} mailbox(es), ${report.messages} message(s), ${report.bytes} bytes; held ${report.blockedMs} ms\n`,
        );
      } finally {
        await directory?.close();
        await bus.close();
      }
    });
}
