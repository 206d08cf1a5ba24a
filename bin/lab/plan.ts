/**
 * The lab's topology: every address, port, secret and user of a whole cluster on loopback,
 * decided once at `lab up` and saved to `<lab>/plan.json`, so that `lab tour`, `lab down` and
 * the day-two commands find the same cluster. Client-facing ports are fixed and memorable;
 * internal ones come from a block of the instance's own (see LabPortBlock).
 */
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { NotFoundError } from '../../common/errors.ts';

export type NodeId = 'a' | 'b';

export interface LabNodePlan {
  node: NodeId;
  /** Admin HTTP of this node's pair-agent (operator commands, /metrics). */
  adminPort: number;
  heartbeatPort: number;
  replicationPort: number;
  dir: string;
}

export interface LabPairPlan {
  id: string;
  /** The pair's floating address: whichever node is primary binds the services here. */
  address: string;
  ports: { imap: number; pop3: number; lmtp: number; admin: number };
  nodes: [LabNodePlan, LabNodePlan];
  weight: number;
}

export interface LabProxyPlan {
  name: string;
  host: string;
  adminPort: number;
  imapPort: number;
  pop3Port: number;
  smtpPort: number;
  submissionPort: number;
}

export interface LabUser {
  uid: string;
  password: string;
  mail: string;
  aliases: string[];
  pair: string;
}

export interface LabPlan {
  dir: string;
  instance: number;
  createdAt: string;
  directory: { mode: 'slapd' | 'ldif'; ldifFile: string; url?: string; bindDn: string; bindPassword: string; baseDn: string; slapdPort: number };
  redis: { mode: 'redis' | 'none'; url?: string; port: number };
  domain: string;
  masterUser: string;
  masterSecret: string;
  heartbeatKey: string;
  replicationSecret: string;
  adminToken: string;
  /** Self-signed certificate for the lab's TLS listeners (STARTTLS, implicit TLS). */
  tls: { certFile: string; keyFile: string };
  pairs: LabPairPlan[];
  proxies: LabProxyPlan[];
  loadbalancer: { host: string; adminPort: number; smtpPort: number; submissionPort: number; imapPort: number; pop3Port: number };
  users: LabUser[];
}

/** Client-facing ports of the lab's load balancer (unprivileged, so no root is needed). */
export const LAB_LB_PORTS = { smtpPort: 2525, submissionPort: 2587, imapPort: 2143, pop3Port: 2110 } as const;
/** Pair service ports on each floating address (127.0.N.1, so every pair can use the same). */
export const LAB_PAIR_PORTS = { imap: 10143, pop3: 10110, lmtp: 10024, admin: 10025 } as const;
export const LAB_BASE_DN = 'dc=pairgate,dc=test';

/**
 * Internal ports of a lab: the block LAB_PORT_BASE + instance * LAB_PORT_BLOCK (12000-13549),
 * below Linux's ephemeral range (32768-60999) and below the 20000-32767 the test suite's
 * servers pick from. A port the kernel hands out for `listen(0)` would be free when planned and
 * could be another program's by the time its role binds it half a minute later (the pairs start
 * first); nothing picks these at random, so only a service configured on one could hold it, and
 * `next()` steps over those.
 */
export const LAB_PORT_BASE = 12_000;
export const LAB_PORT_BLOCK = 50;

export class LabPortBlock {
  private cursor: number;
  private readonly end: number;

  constructor(instance: number) {
    this.cursor = LAB_PORT_BASE + instance * LAB_PORT_BLOCK;
    this.end = this.cursor + LAB_PORT_BLOCK;
  }

  async next(host = '127.0.0.1'): Promise<number> {
    while (this.cursor < this.end) {
      const port = this.cursor++;
      if (!(await portBusy(host, port))) return port;
    }
    throw new Error(`no free port left in 127.0.0.1:${this.end - LAB_PORT_BLOCK}-${this.end - 1}: another program uses them (\`--instance N\` takes another block)`);
  }
}

/** True when something already listens at host:port (a lab still running, or another service). */
export async function portBusy(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once('error', () => resolve(true));
    server.listen(port, host, () => server.close(() => resolve(false)));
  });
}

const secret = () => randomBytes(18).toString('base64url');
const FIRST_NAMES = ['alice', 'bob', 'carol', 'dave', 'erin', 'frank', 'grace', 'heidi', 'ivan', 'judy', 'mallory', 'niaj'];

/** Lab users spread over the pairs round-robin, so every pair has some. */
export function labUsers(count: number, pairIds: string[], domain: string): LabUser[] {
  return Array.from({ length: count }, (_, i) => {
    const uid = i < FIRST_NAMES.length ? FIRST_NAMES[i]! : `user${String(i + 1).padStart(4, '0')}`;
    return {
      uid,
      password: `${uid}-${randomBytes(4).toString('hex')}`,
      mail: `${uid}@${domain}`,
      aliases: [`${uid}.alias@${domain}`],
      pair: pairIds[i % pairIds.length]!,
    };
  });
}

/** A second lab on the same machine (e.g. a test while a lab runs) takes another instance number. */
export const MAX_INSTANCE = 30;

export function lbPorts(instance: number): typeof LAB_LB_PORTS {
  return {
    smtpPort: LAB_LB_PORTS.smtpPort + instance,
    submissionPort: LAB_LB_PORTS.submissionPort + instance,
    imapPort: LAB_LB_PORTS.imapPort + instance,
    pop3Port: LAB_LB_PORTS.pop3Port + instance,
  } as typeof LAB_LB_PORTS;
}

export async function makePlan(opts: {
  dir: string;
  instance: number;
  pairs: number;
  proxies: number;
  users: number;
  directory: LabPlan['directory']['mode'];
  redis: LabPlan['redis']['mode'];
}): Promise<LabPlan> {
  const domain = 'lab.pairgate.test';
  const ports = new LabPortBlock(opts.instance);
  const pairs: LabPairPlan[] = [];
  for (let i = 1; i <= opts.pairs; i++) {
    const id = `pair-${String(i).padStart(2, '0')}`;
    const node = async (n: NodeId): Promise<LabNodePlan> => ({
      node: n,
      adminPort: await ports.next(),
      heartbeatPort: await ports.next(),
      replicationPort: await ports.next(),
      dir: join(opts.dir, id, n),
    });
    pairs.push({ id, address: `127.${opts.instance}.${i}.1`, ports: { ...LAB_PAIR_PORTS }, nodes: [await node('a'), await node('b')], weight: 100 });
  }
  const proxies: LabProxyPlan[] = [];
  for (let i = 1; i <= opts.proxies; i++) {
    proxies.push({
      name: `proxy-${i}`,
      host: '127.0.0.1',
      adminPort: await ports.next(),
      imapPort: await ports.next(),
      pop3Port: await ports.next(),
      smtpPort: await ports.next(),
      submissionPort: await ports.next(),
    });
  }
  return {
    dir: opts.dir,
    instance: opts.instance,
    createdAt: new Date().toISOString(),
    directory: {
      mode: opts.directory,
      ldifFile: join(opts.dir, 'directory.ldif'),
      baseDn: LAB_BASE_DN,
      bindDn: `cn=pairgate,ou=services,${LAB_BASE_DN}`,
      bindPassword: secret(),
      slapdPort: await ports.next(),
    },
    redis: { mode: opts.redis, port: await ports.next() },
    domain,
    masterUser: 'pairgate-master',
    masterSecret: secret(),
    heartbeatKey: secret(),
    replicationSecret: secret(),
    adminToken: secret(),
    tls: { certFile: join(opts.dir, 'tls', 'lab.crt'), keyFile: join(opts.dir, 'tls', 'lab.key') },
    pairs,
    proxies,
    loadbalancer: { host: '127.0.0.1', adminPort: await ports.next(), ...lbPorts(opts.instance) },
    users: labUsers(opts.users, pairs.map((p) => p.id), domain),
  };
}

export const planFile = (dir: string) => join(dir, 'plan.json');

export function savePlan(plan: LabPlan): void {
  writeFileSync(planFile(plan.dir), JSON.stringify(plan, null, 2), { mode: 0o600 });
}

export function loadPlan(dir: string): LabPlan {
  const file = planFile(dir);
  if (!existsSync(file)) throw new NotFoundError(`no lab at ${dir} (no plan.json): run \`pairgate lab up\` first`);
  return JSON.parse(readFileSync(file, 'utf8')) as LabPlan;
}

/** The LDIF the lab's directory starts from: base entries, pairs (with port overrides) and users. */
export function labLdif(plan: LabPlan): string {
  const base = plan.directory.baseDn;
  const out: string[] = [
    `dn: ${base}\nobjectClass: dcObject\nobjectClass: organization\ndc: pairgate\no: pairgate lab\n`,
    `dn: ou=pairs,${base}\nobjectClass: organizationalUnit\nou: pairs\n`,
    `dn: ou=people,${base}\nobjectClass: organizationalUnit\nou: people\n`,
    `dn: ou=services,${base}\nobjectClass: organizationalUnit\nou: services\n`,
    `dn: ${plan.directory.bindDn}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n` +
      `cn: pairgate\nuserPassword: ${plan.directory.bindPassword}\n`,
  ];
  for (const p of plan.pairs) {
    const ports = Object.entries(p.ports).map(([k, v]) => `${k}=${v}`).join(',');
    out.push(
      `dn: cn=${p.id},ou=pairs,${base}\nobjectClass: pairgatePair\ncn: ${p.id}\npairgateAddress: ${p.address}\n` +
        `pairgatePorts: ${ports}\npairgateState: active\npairgateWeight: ${p.weight}\n`,
    );
  }
  for (const u of plan.users) {
    out.push(
      `dn: uid=${u.uid},ou=people,${base}\nobjectClass: inetOrgPerson\nobjectClass: inetLocalMailRecipient\n` +
        `objectClass: pairgateUser\nuid: ${u.uid}\ncn: ${u.uid}\nsn: ${u.uid}\nuserPassword: ${u.password}\n` +
        `mail: ${u.mail}\n${u.aliases.map((a) => `mailLocalAddress: ${a}\n`).join('')}mailHost: ${u.pair}\n`,
    );
  }
  return out.join('\n');
}
