import { describe, expect, it } from 'vitest';
import { validateConfig, parseYaml, expandEnv, z, port } from '../../common/config.ts';
import { ConfigError } from '../../common/errors.ts';
import { AddressList } from '../../common/cidr.ts';

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
