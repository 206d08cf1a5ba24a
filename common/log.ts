/**
 * JSON logs with pino. Secrets are redacted by path so that a config object or a login
 * attempt can be logged whole without leaking a password, master secret or HMAC key.
 */
import { pino, destination, type Logger, type DestinationStream } from 'pino';

export type { Logger };

export const REDACT_PATHS = [
  'password',
  'pass',
  'secret',
  'masterSecret',
  'token',
  'key',
  'hmacKey',
  'bindPassword',
  'userPassword',
  '*.password',
  '*.pass',
  '*.secret',
  '*.masterSecret',
  '*.token',
  '*.hmacKey',
  '*.bindPassword',
  '*.userPassword',
  '*.*.password',
  '*.*.secret',
  '*.*.masterSecret',
  '*.*.hmacKey',
  '*.*.bindPassword',
];

export interface LoggerOptions {
  role: string;
  level?: string;
  /** Extra base fields, e.g. `{ pair: 'pair-01', node: 'a' }`. */
  base?: Record<string, unknown>;
  destination?: DestinationStream;
}

export function createLogger(opts: LoggerOptions): Logger {
  const level = opts.level ?? process.env.PAIRGATE_LOG_LEVEL ?? 'info';
  return pino(
    {
      level,
      base: { role: opts.role, pid: process.pid, ...opts.base },
      redact: { paths: REDACT_PATHS, censor: '[redacted]' },
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
    },
    opts.destination ?? destination({ fd: 2, sync: false }),
  );
}

/** A logger that drops everything, for library use without a configured logger. */
export const silentLogger: Logger = pino({ level: 'silent' });
