/**
 * The lab's configuration files, one YAML per process under `<lab>/config/`, written from the
 * plan. Each is checked against its role's own schema before anything starts, so a lab that
 * drifts from a role's configuration fails at once with the bad key named.
 */
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { stringify } from 'yaml';
import type { ZodTypeAny } from 'zod';
import { validateConfig } from '../../common/config.ts';
import { lbConfigSchema } from '../../loadbalancer/config.ts';
import { checkPairAgentConfig, pairAgentConfigSchema } from '../../pair-agent/config.ts';
import { proxyConfigSchema } from '../../proxy/config.ts';
import { smtpConfigSchema } from '../../proxy/smtp/config.ts';
import type { ClusterFile } from '../status.ts';
import type { LabPairPlan, LabPlan, NodeId } from './plan.ts';

export interface RoleConfigFiles {
  pairAgents: Record<string, string>;
  proxies: Record<string, string>;
  loadbalancer: string;
}

const VOLUME_BYTES = 64 * 1024 * 1024;

/** True when this build has the replicated volume; without it each pair's nodes share one disk file. */
export const haveReplicatedVolume = existsSync(join(dirname(fileURLToPath(import.meta.url)), '../../pair-agent/volume/index.ts'));

function directoryConfig(plan: LabPlan): Record<string, unknown> {
  return plan.directory.mode === 'slapd'
    ? {
        urls: [plan.directory.url],
        bindDn: plan.directory.bindDn,
        bindPassword: plan.directory.bindPassword,
        baseDn: plan.directory.baseDn,
      }
    : { ldif: plan.directory.ldifFile };
}

function redisConfig(plan: LabPlan): Record<string, unknown> | undefined {
  return plan.redis.url ? { url: plan.redis.url } : undefined;
}

export function pairAgentConfig(plan: LabPlan, pair: LabPairPlan, node: NodeId): Record<string, unknown> {
  const self = pair.nodes.find((n) => n.node === node)!;
  const peer = pair.nodes.find((n) => n.node !== node)!;
  return {
    pair: pair.id,
    node,
    preferred: 'a',
    logLevel: 'info',
    admin: { host: '127.0.0.1', port: self.adminPort, token: plan.adminToken },
    ...(plan.redis.url ? { redis: redisConfig(plan) } : {}),
    heartbeat: {
      key: plan.heartbeatKey,
      listen: `127.0.0.1:${self.heartbeatPort}`,
      peers: [`127.0.0.1:${peer.heartbeatPort}`],
      keepaliveMs: 100,
      warntimeMs: 300,
      deadtimeMs: 600,
      initdeadMs: 2000,
    },
    fencing: { device: 'process', pidFile: join(peer.dir, 'pair-agent.pid'), delayMs: node === 'a' ? 0 : 400 },
    pidFile: join(self.dir, 'pair-agent.pid'),
    floatingIp: { mode: 'loopback', address: pair.address },
    serviceAddress: pair.address,
    healthPort: pair.ports.admin,
    ...(haveReplicatedVolume ? { volume: volumeConfig(plan, pair, self, peer) } : { sharedDisk: { file: join(plan.dir, pair.id, 'shared-disk.data'), sizeBytes: VOLUME_BYTES } }),
    store: {
      ports: { imap: pair.ports.imap, pop3: pair.ports.pop3, lmtp: pair.ports.lmtp },
      masterUser: plan.masterUser,
      masterSecret: plan.masterSecret,
      trusted: ['127.0.0.0/8'],
    },
  };
}

type LabNodePlan = LabPairPlan['nodes'][number];

function volumeConfig(plan: LabPlan, pair: LabPairPlan, self: LabNodePlan, peer: LabNodePlan): Record<string, unknown> {
  return {
    name: `${pair.id}-mail`,
    dataFile: join(self.dir, 'volume.data'),
    metaFile: join(self.dir, 'volume.meta'),
    sizeBytes: VOLUME_BYTES,
    listen: `127.0.0.1:${self.replicationPort}`,
    peer: `127.0.0.1:${peer.replicationPort}`,
    secret: plan.replicationSecret,
    protocol: 'C',
  };
}

export function proxyConfig(plan: LabPlan, name: string): Record<string, unknown> {
  const p = plan.proxies.find((x) => x.name === name)!;
  // STARTTLS is offered with the lab's self-signed certificate, but not required, so that the
  // tour's plain clients (and a newcomer's telnet) work.
  const listener = (protocol: 'imap' | 'pop3', port: number) => ({ protocol, host: p.host, port, tls: 'starttls', requireTls: false });
  return {
    id: name,
    log: { level: 'info' },
    admin: { host: p.host, port: p.adminPort, token: plan.adminToken },
    directory: directoryConfig(plan),
    ...(plan.redis.url ? { redis: redisConfig(plan) } : {}),
    tls: { cert: plan.tls.certFile, key: plan.tls.keyFile },
    listeners: [listener('imap', p.imapPort), listener('pop3', p.pop3Port)],
    loadBalancers: ['127.0.0.1/32'],
    backend: { masterUser: plan.masterUser, masterSecret: plan.masterSecret, trustedNetworks: ['127.0.0.0/8'] },
    smtp: {
      hostname: `${name}.lab`,
      listeners: [
        { kind: 'mx', host: p.host, port: p.smtpPort, tls: 'starttls' },
        { kind: 'submission', host: p.host, port: p.submissionPort, tls: 'starttls' },
      ],
      localDomains: [plan.domain],
    },
  };
}

export function loadbalancerConfig(plan: LabPlan): Record<string, unknown> {
  const lb = plan.loadbalancer;
  const pool = (port: (p: LabPlan['proxies'][number]) => number) =>
    plan.proxies.map((p) => ({ name: p.name, address: `${p.host}:${port(p)}`, healthUrl: `http://${p.host}:${p.adminPort}/health` }));
  return {
    logLevel: 'info',
    admin: { host: lb.host, port: lb.adminPort, token: plan.adminToken },
    listeners: [
      { name: 'smtp', listen: `${lb.host}:${lb.smtpPort}`, pool: 'smtp' },
      { name: 'submission', listen: `${lb.host}:${lb.submissionPort}`, pool: 'submission' },
      { name: 'imap', listen: `${lb.host}:${lb.imapPort}`, pool: 'imap' },
      { name: 'pop3', listen: `${lb.host}:${lb.pop3Port}`, pool: 'pop3' },
    ],
    pools: {
      smtp: { proxyProtocol: 'v2', backends: pool((p) => p.smtpPort) },
      submission: { proxyProtocol: 'v2', backends: pool((p) => p.submissionPort) },
      imap: { proxyProtocol: 'v2', backends: pool((p) => p.imapPort) },
      pop3: { proxyProtocol: 'v2', backends: pool((p) => p.pop3Port) },
    },
  };
}

/** Writes every role's YAML and returns the file of each process. */
export function writeRoleConfigs(plan: LabPlan): RoleConfigFiles {
  const dir = join(plan.dir, 'config');
  mkdirSync(dir, { recursive: true });
  const write = (name: string, config: Record<string, unknown>, schema: ZodTypeAny, check?: (c: never) => void): string => {
    // The lab's configs must be what an operator could write: checked by the role's own schema first.
    const parsed = validateConfig(schema, config, `lab config ${name}`);
    check?.(parsed as never);
    if (config.smtp) validateConfig(smtpConfigSchema, config.smtp, `lab config ${name} (smtp)`);
    const file = join(dir, `${name}.yaml`);
    writeFileSync(file, `# written by \`pairgate lab up\` from ${join(plan.dir, 'plan.json')}\n${stringify(config)}`, { mode: 0o600 });
    return file;
  };
  const out: RoleConfigFiles = { pairAgents: {}, proxies: {}, loadbalancer: '' };
  for (const pair of plan.pairs) {
    for (const n of pair.nodes) {
      mkdirSync(n.dir, { recursive: true });
      out.pairAgents[`${pair.id}-${n.node}`] = write(`${pair.id}-${n.node}`, pairAgentConfig(plan, pair, n.node), pairAgentConfigSchema, checkPairAgentConfig);
    }
  }
  for (const p of plan.proxies) out.proxies[p.name] = write(p.name, proxyConfig(plan, p.name), proxyConfigSchema);
  out.loadbalancer = write('loadbalancer', loadbalancerConfig(plan), lbConfigSchema);
  return out;
}

/** What `pairgate status` needs to find the lab's parts without Redis. */
export function clusterFile(plan: LabPlan): ClusterFile {
  return {
    ...(plan.redis.url ? { redis: plan.redis.url } : {}),
    adminToken: plan.adminToken,
    pairs: plan.pairs.map((p) => ({
      id: p.id,
      healthUrl: `http://${p.address}:${p.ports.admin}/health`,
      nodes: p.nodes.map((n) => ({ node: n.node, adminUrl: `http://127.0.0.1:${n.adminPort}` })),
    })),
    proxies: plan.proxies.map((p) => ({ name: p.name, adminUrl: `http://${p.host}:${p.adminPort}` })),
    loadbalancers: [{ name: 'loadbalancer', adminUrl: `http://${plan.loadbalancer.host}:${plan.loadbalancer.adminPort}` }],
  };
}

/** Prometheus file_sd targets for every process of the lab (infra/prometheus/prometheus-lab.yml). */
export function prometheusTargets(plan: LabPlan): Array<{ targets: string[]; labels: Record<string, string> }> {
  return [
    ...plan.pairs.flatMap((p) =>
      p.nodes.map((n) => ({ targets: [`127.0.0.1:${n.adminPort}`], labels: { role: 'pair-agent', pair: p.id, node: n.node } })),
    ),
    ...plan.proxies.map((p) => ({ targets: [`${p.host}:${p.adminPort}`], labels: { role: 'proxy', instance_name: p.name } })),
    { targets: [`${plan.loadbalancer.host}:${plan.loadbalancer.adminPort}`], labels: { role: 'loadbalancer' } },
  ];
}
