/**
 * Config loading for every role: one YAML file, environment references for secrets,
 * validation against a zod schema, and one error line naming the bad key.
 *
 * A string value may reference the environment as `${NAME}` or `${NAME:-default}` so that
 * secrets (master password, HMAC keys, LDAP bind password) need not sit in the file.
 */
import { readFileSync } from 'node:fs';
import { parseDocument } from 'yaml';
import { z, type ZodTypeAny } from 'zod';
import { ConfigError } from './errors.ts';

const ENV_REF = /\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}/g;

export function expandEnv(value: unknown, env: NodeJS.ProcessEnv = process.env, path = ''): unknown {
  if (typeof value === 'string') {
    return value.replace(ENV_REF, (_all, name: string, fallback: string | undefined) => {
      const v = env[name];
      if (v !== undefined) return v;
      if (fallback !== undefined) return fallback;
      throw new ConfigError(path, `environment variable ${name} is not set`);
    });
  }
  if (Array.isArray(value)) return value.map((v, i) => expandEnv(v, env, `${path}[${i}]`));
  if (value && typeof value === 'object') {
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(value)) out[k] = expandEnv(v, env, path ? `${path}.${k}` : k);
    return out;
  }
  return value;
}

function describeReceived(issue: z.ZodIssue): string {
  if (issue.code === 'invalid_type') return issue.received === 'undefined' ? `missing (expected ${issue.expected})` : `expected ${issue.expected}, got ${issue.received}`;
  if (issue.code === 'unrecognized_keys') return `unknown key${issue.keys.length > 1 ? 's' : ''} ${issue.keys.join(', ')}`;
  if (issue.code === 'invalid_enum_value') return `expected one of ${issue.options.join('|')}, got ${JSON.stringify(issue.received)}`;
  return issue.message;
}

function issuePath(issue: z.ZodIssue): string {
  const parts = issue.path.map((p) => (typeof p === 'number' ? `[${p}]` : `.${p}`)).join('');
  const key = parts.startsWith('.') ? parts.slice(1) : parts;
  if (issue.code === 'unrecognized_keys' && issue.keys.length === 1) return key ? `${key}.${issue.keys[0]}` : issue.keys[0]!;
  return key || '(top level)';
}

/** Validates an already-parsed object; throws ConfigError naming the first bad key. */
export function validateConfig<S extends ZodTypeAny>(schema: S, raw: unknown, source = 'config'): z.output<S> {
  const expanded = expandEnv(raw ?? {});
  const result = schema.safeParse(expanded);
  if (!result.success) {
    const issue = result.error.issues[0]!;
    const key = issuePath(issue);
    const msg = issue.code === 'unrecognized_keys' && issue.keys.length === 1 ? 'unknown key' : describeReceived(issue);
    throw new ConfigError(key, `${msg} (in ${source})`);
  }
  return result.data;
}

export function parseYaml(text: string, source: string): unknown {
  const doc = parseDocument(text, { prettyErrors: true });
  if (doc.errors.length > 0) {
    const e = doc.errors[0]!;
    const line = e.linePos?.[0]?.line;
    throw new ConfigError('', `${source}${line ? `:${line}` : ''}: malformed YAML: ${e.message.replace(/ at line \d+, column \d+:?/, "").split('\n')[0]}`);
  }
  return doc.toJS();
}

/** Reads, expands and validates a YAML config file. */
export function loadConfigFile<S extends ZodTypeAny>(schema: S, file: string): z.output<S> {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError('', `cannot read config file ${file}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
  }
  return validateConfig(schema, parseYaml(text, file), file);
}

// Reusable field schemas, so every role spells ports, durations and addresses the same way.
export const port = z.number().int().min(0).max(65535);
export const durationMs = z.number().int().min(0);
export const hostPort = z.string().regex(/^(\[[0-9a-fA-F:.]+\]|[^:\s]+):\d{1,5}$/, 'expected host:port');
export const logLevel = z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info');

export const adminSchema = z
  .object({
    host: z.string().default('127.0.0.1'),
    port: port.default(0),
    /** Bearer token required for state-changing admin calls from non-loopback clients. */
    token: z.string().optional(),
  })
  .strict()
  .default({});

export const redisSchema = z
  .object({
    url: z.string().default('redis://127.0.0.1:6379'),
    connectTimeoutMs: durationMs.default(1000),
    commandTimeoutMs: durationMs.default(500),
  })
  .strict();

export const tlsSchema = z
  .object({
    cert: z.string(),
    key: z.string(),
    ca: z.string().optional(),
  })
  .strict();

export type AdminConfig = z.output<typeof adminSchema>;
export type RedisConfig = z.output<typeof redisSchema>;
export type TlsFiles = z.output<typeof tlsSchema>;
export { z };
