/**
 * Process lifecycle for long-running roles: graceful stop on SIGTERM/SIGINT within a bound,
 * reload on SIGHUP, and a last log line for anything that escapes.
 */
import type { Logger } from './log.ts';

export interface LifecycleOptions {
  log: Logger;
  /** Stops accepting and finishes or hands off sessions. */
  stop: (reason: string) => Promise<void>;
  /** Re-reads config; throwing keeps the old config. */
  reload?: () => Promise<void>;
  stopTimeoutMs?: number;
}

export function installLifecycle(opts: LifecycleOptions): void {
  let stopping = false;
  const stop = (signal: string) => {
    if (stopping) {
      opts.log.warn({ signal }, 'second stop signal: exiting now');
      process.exit(1);
    }
    stopping = true;
    opts.log.info({ signal }, 'stopping');
    const bound = opts.stopTimeoutMs ?? 10_000;
    const timer = setTimeout(() => {
      opts.log.warn({ boundMs: bound }, 'graceful stop took too long: exiting');
      process.exit(1);
    }, bound);
    timer.unref();
    opts
      .stop(signal)
      .then(() => {
        opts.log.info('stopped');
        opts.log.flush?.();
        setImmediate(() => process.exit(0));
      })
      .catch((err) => {
        opts.log.error({ err }, 'error while stopping');
        process.exit(1);
      });
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  if (opts.reload) {
    const reload = opts.reload;
    process.on('SIGHUP', () => {
      opts.log.info('SIGHUP: reloading config');
      reload().then(
        () => opts.log.info('config reloaded'),
        (err) => opts.log.error({ err: (err as Error).message }, 'config reload refused; keeping the old config'),
      );
    });
  }
  process.on('unhandledRejection', (err) => {
    opts.log.error({ err }, 'unhandled rejection');
  });
}
