import { describe, expect, it } from 'vitest';
import { validateConfig, parseYaml, expandEnv, z, port } from '../../common/config.ts';
import { ConfigError } from '../../common/errors.ts';
import { AddressList } from '../../common/cidr.ts';
import { createLogger, redactString } from '../../common/log.ts';
import { Writable } from 'node:stream';
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';

const schema = z
  .object({
    listen: z.object({ host: z.string(), port }).strict(),
    secret: z.string(),
    mode: z.enum(['loopback', 'iproute']).default('loopback'),
  })
  .strict();

describe('config', () => {
  it('validates and fills defaults', () => {
    const cfg = validateConfig(schema, { listen: { host: '127.0.0.1', port: 25 }, secret: 's' });
    expect(cfg.mode).toBe('loopback');
  });

  it('names an unknown key', () => {
    expect(() => validateConfig(schema, { listen: { host: 'h', port: 1, prot: 2 }, secret: 's' })).toThrowError(/listen\.prot: unknown key/);
  });

  it('names a key with the wrong type and what was expected', () => {
    const err = (() => {
      try {
        validateConfig(schema, { listen: { host: 'h', port: 'x' }, secret: 's' });
      } catch (e) {
        return e as ConfigError;
      }
    })();
    expect(err).toBeInstanceOf(ConfigError);
    expect(err!.key).toBe('listen.port');
    expect(err!.message).toMatch(/expected number, got string/);
  });

  it('names a missing key as missing', () => {
    expect(() => validateConfig(schema, { listen: { host: 'h', port: 1 } }, 'x.yaml')).toThrowError(/^secret: missing \(expected string\) \(in x\.yaml\)$/);
  });

  it('names an enum key and its choices', () => {
    expect(() => validateConfig(schema, { listen: { host: 'h', port: 1 }, secret: 's', mode: 'vrrp' })).toThrowError(
      /mode: expected one of loopback\|iproute/,
    );
  });

  it('expands environment references, with defaults, and names a missing one', () => {
    expect(expandEnv({ a: '${X}', b: ['${Y:-dflt}'] }, { X: 'from-env' })).toEqual({ a: 'from-env', b: ['dflt'] });
    expect(() => expandEnv({ ldap: { bindPassword: '${NOPE}' } }, {})).toThrowError(/ldap\.bindPassword: environment variable NOPE is not set/);
  });

  it('reports malformed YAML with its line', () => {
    expect(() => parseYaml('a: 1\nb: [1, 2\nc: 3\n', 'x.yaml')).toThrowError(/x\.yaml:\d+: malformed YAML/);
  });
});

describe('address lists', () => {
  it('matches CIDRs, single addresses and IPv4-mapped IPv6', () => {
    const list = new AddressList(['127.0.0.0/8', '10.1.2.3', 'fd00::/8']);
    expect(list.has('127.9.9.9')).toBe(true);
    expect(list.has('::ffff:127.0.0.1')).toBe(true);
    expect(list.has('10.1.2.3')).toBe(true);
    expect(list.has('10.1.2.4')).toBe(false);
    expect(list.has('fd12::1')).toBe(true);
    expect(list.has(undefined)).toBe(false);
    expect(list.has('garbage')).toBe(false);
  });

  it('refuses a bad entry, naming it', () => {
    expect(() => new AddressList(['10.0.0.0/33'], 'trusted')).toThrowError(/trusted\[0\]/);
    expect(() => new AddressList(['nope'], 'trusted')).toThrowError(/trusted\[0\]: not an IP/);
  });
});

describe('logging', () => {
  function capture(): { log: ReturnType<typeof createLogger>; lines: () => Record<string, unknown>[]; raw: () => string } {
    const chunks: string[] = [];
    const dest = new Writable({
      write(c, _e, cb) {
        chunks.push(String(c));
        cb();
      },
    });
    const log = createLogger({ role: 'test', level: 'info', destination: dest as never });
    return { log, raw: () => chunks.join(''), lines: () => chunks.join('').trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>) };
  }

  it('redacts secrets by key at any depth, in URLs and in the message, without touching the caller\'s object', () => {
    const { log, lines, raw } = capture();
    const config = {
      directory: { urls: ['ldap://ldap1:389'], bindDn: 'cn=svc', bindPassword: 'S-bind' },
      proxy: { backend: { master: { user: 'master', masterSecret: 'S-master' } } },
      heartbeat: { links: [{ host: '10.0.0.1', hmacKey: 'S-hmac' }] },
      volume: { replicationSecret: 'S-repl' },
      admin: { port: 9000, token: 'S-token' },
      headers: { Authorization: 'Bearer S-bearer' },
      redis: { url: 'redis://default:S-url@127.0.0.1:6379/0' },
    };
    const before = JSON.stringify(config);
    log.info({ config, password: 'S-top', user: { login: 'alice', password: 'S-user' } }, 'connecting to redis://:S-msg@10.0.0.9:6379');
    log.child({ tokens: ['S-child'] }).warn('child');
    log.error({ err: new Error('failed at ldap://cn=x:S-err@h:389') }, 'with an error');
    expect(JSON.stringify(config)).toBe(before);
    const out = raw();
    for (const s of ['S-bind', 'S-master', 'S-hmac', 'S-repl', 'S-token', 'S-bearer', 'S-url', 'S-top', 'S-user', 'S-msg', 'S-child', 'S-err']) expect(out).not.toContain(s);
    const [first, , third] = lines();
    expect(first).toMatchObject({
      msg: 'connecting to redis://:[redacted]@10.0.0.9:6379',
      config: { directory: { urls: ['ldap://ldap1:389'], bindDn: 'cn=svc', bindPassword: '[redacted]' }, redis: { url: 'redis://default:[redacted]@127.0.0.1:6379/0' } },
      user: { login: 'alice', password: '[redacted]' },
    });
    // Errors keep what explains them.
    expect(third!.err).toMatchObject({ type: 'Error', message: 'failed at ldap://cn=x:[redacted]@h:389' });
    expect(String((third!.err as { stack: string }).stack)).toContain('common.test.ts');
  });
});

describe('redactString', () => {
  it('drops a URL password that holds unescaped / or @, keeping the user and the host', () => {
    expect(redactString('redis://:s3cr/et@host:6379')).toBe('redis://:[redacted]@host:6379');
    expect(redactString('redis://:p@ss@host')).toBe('redis://:[redacted]@host');
    expect(redactString('dial ldaps://svc:a:b@ldap1:636 failed')).toBe('dial ldaps://svc:[redacted]@ldap1:636 failed');
    expect(redactString('mail alice@example.net via smtp://relay:25')).toBe('mail alice@example.net via smtp://relay:25');
  });
});

describe('package.json', () => {
  it('has a bench:<subject> script for every bench/*.ts, running the same as `npm run bench -- <subject>`', () => {
    const root = join(import.meta.dirname, '../..');
    const scripts = (JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { scripts: Record<string, string> }).scripts;
    const subjects = readdirSync(join(root, 'bench')).filter((f) => f.endsWith('.ts')).map((f) => f.slice(0, -3));
    expect(subjects.length).toBeGreaterThan(0);
    for (const s of subjects) expect(scripts[`bench:${s}`], `bench:${s}`).toBe(`${scripts.bench} ${s}`);
  });
});
