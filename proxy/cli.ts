/**
 * `pairgate proxy --config FILE`: runs the proxy role (IMAP/POP3 front ends, and the SMTP
 * front ends when configured) until SIGTERM/SIGINT; SIGHUP re-reads the file (certificates,
 * limits, timeouts; a bad file is refused whole and the old config kept).
 */
import type { Command } from 'commander';
import { loadConfigFile } from '../common/config.ts';
import { createLogger } from '../common/log.ts';
import { installLifecycle } from '../common/lifecycle.ts';
import { proxyConfigSchema, proxyRegistry, startProxy } from './index.ts';

export function register(program: Command): void {
  program
    .command('proxy')
    .description('run a proxy: IMAP/POP3 (and SMTP) front ends that route each user to the home pair')
    .requiredOption('-c, --config <file>', 'proxy config file (YAML)')
    .action(async (opts: { config: string }) => {
      const config = loadConfigFile(proxyConfigSchema, opts.config);
      const log = createLogger({ role: 'proxy', level: config.log.level, ...(config.id ? { base: { proxy: config.id } } : {}) });
      const registry = proxyRegistry({ role: 'proxy', ...(config.id ? { instance_name: config.id } : {}) });
      const proxy = await startProxy(config, { log, registry });
      installLifecycle({
        log,
        stop: () => proxy.stop(),
        reload: async () => proxy.reload(loadConfigFile(proxyConfigSchema, opts.config)),
        stopTimeoutMs: config.stopGraceMs + 8000,
      });
    });
}
