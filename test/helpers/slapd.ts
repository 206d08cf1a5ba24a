/**
 * A private OpenLDAP slapd for tests and the lab: cn=config built with slapadd from the core,
 * cosine, inetorgperson and misc schemas plus pairgate's own (infra/ldap/pairgate.ldif), an
 * MDB database seeded offline from LDIF, listening on ephemeral loopback ports (ldap:// and,
 * with `tls`, ldaps:// and StartTLS with a throwaway certificate).
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { startProcess, tempDir, type Managed } from './proc.ts';
import { freePort, waitForPort } from './net.ts';
import { makeTestCert, type TestCert } from './tls.ts';

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
export const PAIRGATE_SCHEMA_LDIF = join(repoRoot, 'infra/ldap/pairgate.ldif');
export const SAMPLE_LDIF = join(repoRoot, 'infra/ldap/sample.ldif');

export const BASE_DN = 'dc=pairgate,dc=test';
export const ADMIN_DN = `cn=admin,${BASE_DN}`;
export const ADMIN_PASSWORD = 'admin-secret';
export const SERVICE_DN = `cn=pairgate,ou=services,${BASE_DN}`;
export const SERVICE_PASSWORD = 'service-pass';

export interface SlapdOptions {
  /** LDIF files with the data (default: infra/ldap/sample.ldif). */
  ldif?: string[];
  tls?: boolean;
  suffix?: string;
}

export interface Slapd {
  url: string;
  ldapsUrl?: string;
  host: string;
  port: number;
  suffix: string;
  adminDn: string;
  adminPassword: string;
  cert?: TestCert;
  proc: Managed;
  dir: string;
  stop(): Promise<void>;
  start(): Promise<void>;
  close(): Promise<void>;
}

function configLdif(dir: string, suffix: string, cert?: TestCert): string {
  const tls = cert
    ? `olcTLSCertificateFile: ${cert.certFile}\nolcTLSCertificateKeyFile: ${cert.keyFile}\n`
    : '';
  return `dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: ${dir}/slapd.pid
olcArgsFile: ${dir}/slapd.args
olcLogLevel: none
${tls}
dn: cn=module{0},cn=config
objectClass: olcModuleList
cn: module{0}
olcModulePath: /usr/lib/ldap
olcModuleLoad: back_mdb

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

include: file:///etc/ldap/schema/core.ldif

include: file:///etc/ldap/schema/cosine.ldif

include: file:///etc/ldap/schema/inetorgperson.ldif

include: file:///etc/ldap/schema/misc.ldif

include: file://${PAIRGATE_SCHEMA_LDIF}

dn: olcDatabase={-1}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {-1}frontend
olcSizeLimit: 1000

dn: olcDatabase={0}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {0}config
olcAccess: {0}to * by * none

dn: olcDatabase={1}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {1}mdb
olcDbDirectory: ${dir}/data
olcSuffix: ${suffix}
olcRootDN: cn=admin,${suffix}
olcRootPW: ${ADMIN_PASSWORD}
olcDbMaxSize: 4294967296
olcDbNoSync: TRUE
olcDbIndex: objectClass eq
olcDbIndex: uid eq
olcDbIndex: mail eq
olcDbIndex: mailLocalAddress eq
olcDbIndex: mailHost eq
olcDbIndex: cn eq
olcAccess: {0}to attrs=userPassword by self write by anonymous auth by * none
olcAccess: {1}to * by users read by * none
`;
}

/**
 * Builds a slapd instance in `dir` (cn=config and the MDB database seeded from `ldif`) and
 * returns the arguments that run it in the foreground. The lab runs these under its own
 * supervisor; tests use startSlapd below.
 */
export function prepareSlapdDir(
  dir: string,
  opts: SlapdOptions & { urls: string[] },
): { confDir: string; cert?: TestCert; args: string[] } {
  const suffix = opts.suffix ?? BASE_DN;
  const confDir = join(dir, 'slapd.d');
  mkdirSync(confDir, { recursive: true });
  mkdirSync(join(dir, 'data'), { recursive: true });
  const cert = opts.tls ? makeTestCert(dir, 'slapd') : undefined;
  writeFileSync(join(dir, 'config.ldif'), configLdif(dir, suffix, cert));
  execFileSync('slapadd', ['-n', '0', '-F', confDir, '-l', join(dir, 'config.ldif')], { stdio: 'pipe' });
  for (const file of opts.ldif ?? [SAMPLE_LDIF]) {
    // -q: no consistency checks beyond schema, as for bulk loads; fine for generated data.
    execFileSync('slapadd', ['-q', '-n', '1', '-F', confDir, '-l', file], { stdio: 'pipe' });
  }
  // -d 0 keeps slapd in the foreground so that its starter owns the process.
  return { confDir, ...(cert ? { cert } : {}), args: ['-d', '0', '-F', confDir, '-h', opts.urls.join(' ')] };
}

export async function startSlapd(opts: SlapdOptions = {}): Promise<Slapd> {
  const tmp = tempDir('pairgate-slapd-');
  const dir = tmp.path;
  const suffix = opts.suffix ?? BASE_DN;
  const host = '127.0.0.1';
  const port = await freePort();
  const tlsPort = opts.tls ? await freePort() : undefined;
  const urls = [`ldap://${host}:${port}/`, ...(tlsPort ? [`ldaps://${host}:${tlsPort}/`] : [])];
  const { cert, args } = prepareSlapdDir(dir, { ...opts, urls });
  const launch = async () => {
    const proc = startProcess('slapd', '/usr/sbin/slapd', args);
    await waitForPort(host, port, 15_000, proc.alive).catch((err) => {
      throw new Error(`${err.message}\n${proc.output()}`);
    });
    return proc;
  };
  const slapd: Slapd = {
    url: `ldap://${host}:${port}`,
    ...(tlsPort ? { ldapsUrl: `ldaps://${host}:${tlsPort}` } : {}),
    host,
    port,
    suffix,
    adminDn: `cn=admin,${suffix}`,
    adminPassword: ADMIN_PASSWORD,
    ...(cert ? { cert } : {}),
    dir,
    proc: await launch(),
    stop: () => slapd.proc.stop(5000),
    start: async () => {
      slapd.proc = await launch();
    },
    close: async () => {
      await slapd.proc.stop(5000);
      tmp.cleanup();
    },
  };
  return slapd;
}
