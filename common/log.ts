/**
 * JSON logs with pino. Secrets are redacted by key name at any depth (and passwords inside
 * URLs such as `redis://:pw@host` or `ldap://cn=x:pw@host`, in values and in the message), so
 * that a config object, an error or a login attempt can be logged whole without leaking a
 * password, master secret, token or HMAC key.
 */
import { pino, destination, stdSerializers, type Logger, type DestinationStream } from 'pino';

export type { Logger };

export const CENSOR = '[redacted]';

/** Key names (compared in lower case) whose values are never written. */
const SECRET_KEYS = new Set([
  'password',
  'pass',
  'passwd',
  'secret',
  'token',
  'tokens',
  'key',
  'hmackey',
  'heartbeatkey',
  'privatekey',
  'apikey',
  'authorization',
  'proxy-authorization',
  'cookie',
  'set-cookie',
  'credentials',
  'pwd',
]);
/** Any key ending like this is a secret too: bindPassword, userPassword, masterSecret, adminToken… */
const SECRET_SUFFIX = /(password|passwd|secret|token|passwordhash)$/i;

export function isSecretKey(name: string): boolean {
  return SECRET_KEYS.has(name.toLowerCase()) || SECRET_SUFFIX.test(name);
}

// scheme://user:password@host: keep the user (it says which account), drop the password, up
// to the last @ of the token: operators write unescaped / and @ in passwords too.
const URL_CREDENTIALS = /\b([a-z][a-z0-9+.-]*:\/\/[^\s:/@]*):\S*@/gi;

export function redactString(s: string): string {
  return s.includes('@') && s.includes('://') ? s.replace(URL_CREDENTIALS, `$1:${CENSOR}@`) : s;
}

const MAX_DEPTH = 8;

/**
 * A copy of `value` with secrets censored; the caller's object is never changed. Plain objects
 * and arrays are walked (to a bounded depth, which also stops cycles); Errors are serialized
 * as pino would and then walked; other class instances are left to pino.
 */
export function redact(value: unknown, depth = 0): unknown {
  if (typeof value === 'string') return redactString(value);
  if (value === null || typeof value !== 'object') return value;
  if (depth >= MAX_DEPTH) return '[too deep]';
  if (Array.isArray(value)) return value.map((v) => redact(v, depth + 1));
  // Spread: the serialized error's prototype is not Object's, and its fields are own ones.
  if (value instanceof Error) return redact({ ...stdSerializers.err(value) }, depth + 1);
  const proto = Object.getPrototypeOf(value);
  if (proto !== Object.prototype && proto !== null) return value;
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(value as Record<string, unknown>)) {
    out[k] = v !== undefined && v !== null && v !== '' && isSecretKey(k) ? CENSOR : redact(v, depth + 1);
  }
  return out;
}

/**
 * pino applies no formatter to a child logger's bindings, only its path redaction: these
 * paths cover the bindings (top level and one below); everything logged goes through redact().
 */
const BINDING_KEYS = ['password', 'pass', 'secret', 'masterSecret', 'token', 'tokens', 'key', 'hmacKey', 'heartbeatKey', 'bindPassword', 'userPassword', 'replicationSecret', 'adminToken', 'authorization'];
export const REDACT_PATHS = [...BINDING_KEYS, ...BINDING_KEYS.map((k) => `*.${k}`)];

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
      redact: { paths: REDACT_PATHS, censor: CENSOR },
      // redact() has already turned Errors into plain objects; serializing again would call them "Object".
      serializers: { err: (e: unknown) => (e instanceof Error ? stdSerializers.err(e) : e) },
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: {
        level: (label) => ({ level: label }),
        bindings: (b) => redact(b) as Record<string, unknown>,
        log: (o) => redact(o) as Record<string, unknown>,
      },
      hooks: {
        // The message text is not part of the object the formatters see.
        logMethod(args, method) {
          for (let i = 0; i < args.length; i++) if (typeof args[i] === 'string') args[i] = redactString(args[i] as string);
          return method.apply(this, args as Parameters<typeof method>);
        },
      },
    },
    opts.destination ?? destination({ fd: 2, sync: false }),
  );
}

/** A logger that drops everything, for library use without a configured logger. */
export const silentLogger: Logger = pino({ level: 'silent' });
