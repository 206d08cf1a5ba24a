/**
 * `pairgate lab up|tour|down`: a whole cluster on one machine, on loopback — directory, Redis,
 * two pairs of two pair-agents, two proxies and a load balancer — each a real process with its
 * own log under the lab folder. `up` prints where everything listens, runs the tour and stays
 * up until Ctrl-C; `tour` runs the tour against a running lab; `down` stops a lab left running.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { makeTestCert } from '../test/helpers/tls.ts';
import type { Command } from 'commander';
import { REPO_ROOT, Supervisor, pidAlive, stopFromState, type LabProcess, type LabState } from './lab/supervisor.ts';
import { MAX_INSTANCE, labLdif, lbPorts, loadPlan, makePlan, portBusy, savePlan, type LabPlan } from './lab/plan.ts';
import { writeRoleConfigs, clusterFile, haveReplicatedVolume, prometheusTargets } from './lab/role-configs.ts';
import { waitUntil } from './lab/wait.ts';
import { runTour } from './lab/tour.ts';
import { collectStatus, renderStatus } from './status.ts';

const DEFAULT_DIR = join(REPO_ROOT, 'lab');

function hasCommand(cmd: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

function slapdAvailable(): boolean {
  return existsSync('/usr/sbin/slapd') && hasCommand('slapadd');
}

async function httpOk(url: string): Promise<boolean> {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(1000) });
    await res.arrayBuffer();
    return res.ok;
  } catch {
    return false;
  }
}

function runningLab(dir: string): LabState | null {
  const file = join(dir, 'state.json');
  if (!existsSync(file)) return null;
  const state = JSON.parse(readFileSync(file, 'utf8')) as LabState;
  return state.processes.some((p) => pidAlive(p.pid)) ? state : null;
}

const say = (line: string) => process.stdout.write(`${line}\n`);

/** Starts the directory and Redis the lab's roles depend on (private servers when installed). */
async function startDependencies(sup: Supervisor, plan: LabPlan): Promise<void> {
  writeFileSync(plan.directory.ldifFile, labLdif(plan), { mode: 0o600 });
  mkdirSync(dirname(plan.tls.certFile), { recursive: true });
  makeTestCert(dirname(plan.tls.certFile), 'lab');
  if (plan.directory.mode === 'slapd') {
    const { prepareSlapdDir } = await import('../test/helpers/slapd.ts');
    const port = plan.directory.slapdPort;
    const slapdDir = join(plan.dir, 'slapd');
    const url = `ldap://127.0.0.1:${port}`;
    const { args } = prepareSlapdDir(slapdDir, { ldif: [plan.directory.ldifFile], urls: [`${url}/`] });
    sup.start('slapd', args, { cmd: '/usr/sbin/slapd' });
    plan.directory.url = url;
    if (!(await waitUntil(() => portOpen(port), 15_000))) throw new Error('slapd did not start: see logs/slapd.log');
    say(`directory: private slapd at ${url} (base ${plan.directory.baseDn})`);
  } else {
    say(`directory: slapd is not installed, so the embedded LDIF directory ${plan.directory.ldifFile} is used`);
  }
  if (plan.redis.mode === 'redis') {
    const port = plan.redis.port;
    mkdirSync(join(plan.dir, 'redis'), { recursive: true });
    sup.start('redis', ['--bind', '127.0.0.1', '--port', String(port), '--save', '', '--appendonly', 'no', '--dir', join(plan.dir, 'redis')], {
      cmd: 'redis-server',
    });
    plan.redis.url = `redis://127.0.0.1:${port}`;
    if (!(await waitUntil(() => portOpen(port), 10_000))) throw new Error('redis-server did not start: see logs/redis.log');
    say(`redis: private redis-server at ${plan.redis.url}`);
  } else {
    say('redis: redis-server is not installed, so the lab runs without Redis (proxies route by polling pair health)');
  }
}

async function portOpen(port: number): Promise<boolean> {
  return portBusy('127.0.0.1', port);
}

/** The last lines of a role's log, for an error that says why it did not start. */
function logTail(file: string, lines = 12): string {
  try {
    return readFileSync(file, 'utf8').trimEnd().split('\n').slice(-lines).map((l) => `    ${l}`).join('\n');
  } catch {
    return '    (no log)';
  }
}

/** Waits for a role's /health; a process that exits meanwhile fails the wait at once. */
async function waitHealthy(proc: LabProcess, url: string, timeoutMs: number): Promise<void> {
  const answered = await waitUntil(async () => !proc.alive() || (await httpOk(url)), timeoutMs, 200);
  if (answered && proc.alive()) return;
  const why = proc.alive() ? `did not become healthy within ${timeoutMs / 1000} s (${url})` : `exited while starting (code ${await proc.exited})`;
  throw new Error(`${proc.name} ${why}; the end of ${proc.logFile}:\n${logTail(proc.logFile)}`);
}

/** Starts every pair-agent, proxy and the balancer, waiting for each tier to report healthy. */
async function startRoles(sup: Supervisor, plan: LabPlan): Promise<void> {
  const configs = writeRoleConfigs(plan);
  say(
    haveReplicatedVolume
      ? 'volumes: each node keeps its own replicated volume (protocol C) under its folder'
      : 'volumes: this build has no replicated volume (pair-agent/volume), so each pair shares one disk file between its nodes',
  );
  for (const pair of plan.pairs) {
    for (const node of pair.nodes) sup.start(`${pair.id}-${node.node}`, ['pair-agent', '--config', configs.pairAgents[`${pair.id}-${node.node}`]!]);
  }
  for (const pair of plan.pairs) {
    const url = `http://${pair.address}:${pair.ports.admin}/health`;
    if (!(await waitUntil(() => httpOk(url), 30_000, 200))) {
      const ends = pair.nodes.map((n) => join(plan.dir, 'logs', `${pair.id}-${n.node}.log`)).map((f) => `the end of ${f}:\n${logTail(f)}`);
      throw new Error(`${pair.id} did not start serving within 30 s (${url}); ${ends.join('\n')}`);
    }
    say(`${pair.id}: serving at ${pair.address} (imap ${pair.ports.imap}, pop3 ${pair.ports.pop3}, lmtp ${pair.ports.lmtp})`);
  }
  const proxies = plan.proxies.map((proxy) => ({ proxy, proc: sup.start(proxy.name, ['proxy', '--config', configs.proxies[proxy.name]!]) }));
  for (const { proxy, proc } of proxies) await waitHealthy(proc, `http://${proxy.host}:${proxy.adminPort}/health`, 30_000);
  say(`proxies: ${plan.proxies.map((p) => p.name).join(', ')} up`);
  const lb = sup.start('loadbalancer', ['lb', '--config', configs.loadbalancer]);
  await waitHealthy(lb, `http://${plan.loadbalancer.host}:${plan.loadbalancer.adminPort}/health`, 30_000);
  writeFileSync(join(plan.dir, 'cluster.json'), JSON.stringify(clusterFile(plan), null, 2), { mode: 0o600 });
  writeFileSync(join(plan.dir, 'prometheus-targets.json'), JSON.stringify(prometheusTargets(plan), null, 2));
}

function printWelcome(plan: LabPlan): void {
  const lb = plan.loadbalancer;
  say('');
  say('pairgate lab is up. Clients connect to the load balancer:');
  say(`  SMTP (MX)      ${lb.host}:${lb.smtpPort}     e.g. swaks --server ${lb.host}:${lb.smtpPort} --to ${plan.users[0]!.mail}`);
  say(`  submission     ${lb.host}:${lb.submissionPort}     (AUTH after STARTTLS)`);
  say(`  IMAP           ${lb.host}:${lb.imapPort}`);
  say(`  POP3           ${lb.host}:${lb.pop3Port}`);
  say(`  LB admin       http://${lb.host}:${lb.adminPort}/metrics`);
  for (const p of plan.proxies) say(`  ${p.name}        admin http://${p.host}:${p.adminPort}/metrics`);
  for (const p of plan.pairs) {
    say(`  ${p.id}        ${p.address} health http://${p.address}:${p.ports.admin}/health; nodes a, b admin ${p.nodes.map((n) => `:${n.adminPort}`).join(' ')}`);
  }
  say('Users (login / password / home pair):');
  for (const u of plan.users) say(`  ${u.uid.padEnd(8)} ${u.password.padEnd(16)} ${u.pair}   ${u.mail}`);
  say(`Logs: ${join(plan.dir, 'logs')}   Status: npx pairgate status --cluster ${join(plan.dir, 'cluster.json')}`);
  say('');
}

/**
 * Restarts a pair-agent that died (as systemd's Restart=on-failure would), so that after the
 * tour's SIGKILL the node comes back, rejoins as standby and resyncs.
 */
function keepPairAgentsRunning(sup: Supervisor, plan: LabPlan, configs: ReturnType<typeof writeRoleConfigs>, stopping: () => boolean): void {
  for (const pair of plan.pairs) {
    for (const node of pair.nodes) {
      const name = `${pair.id}-${node.node}`;
      const watch = () => {
        const proc = sup.get(name);
        void proc?.exited.then(async () => {
          if (stopping()) return;
          await new Promise((r) => setTimeout(r, 2000));
          if (stopping()) return;
          say(`lab: ${name} exited; restarting it (as systemd would)`);
          sup.start(name, ['pair-agent', '--config', configs.pairAgents[name]!]);
          watch();
        });
      };
      watch();
    }
  }
}

export async function labUp(opts: { dir: string; tour: boolean; users: number; instance: number }): Promise<void> {
  const dir = resolve(opts.dir);
  if (runningLab(dir)) throw new Error(`a lab is already running in ${dir}: stop it with \`pairgate lab down\``);
  if (!Number.isInteger(opts.instance) || opts.instance < 0 || opts.instance > MAX_INSTANCE) {
    throw new Error(`--instance must be an integer from 0 to ${MAX_INSTANCE}`);
  }
  for (const [name, port] of Object.entries(lbPorts(opts.instance))) {
    if (await portBusy('127.0.0.1', port)) throw new Error(`port 127.0.0.1:${port} (${name}) is taken: is another lab running? (\`--instance N\` runs a second one)`);
  }
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const plan = await makePlan({
    dir,
    instance: opts.instance,
    pairs: 2,
    proxies: 2,
    users: opts.users,
    directory: slapdAvailable() ? 'slapd' : 'ldif',
    redis: hasCommand('redis-server') ? 'redis' : 'none',
  });
  const sup = new Supervisor(dir);
  let stopping = false;
  const shutdown = async (why: string) => {
    if (stopping) return;
    stopping = true;
    say(`\nlab: ${why}; stopping every process…`);
    await sup.stopAll();
    say('lab: stopped.');
    process.exit(0);
  };
  process.on('SIGINT', () => void shutdown('Ctrl-C'));
  process.on('SIGTERM', () => void shutdown('SIGTERM'));
  // A closed terminal, or a reader that went away (`npm run lab | tee`, where Ctrl-C ends tee
  // first), must not leave the cluster running: stop everything, writing nowhere if need be.
  process.on('SIGHUP', () => void shutdown('terminal closed'));
  for (const stream of [process.stdout, process.stderr]) stream.on('error', () => void shutdown('output closed'));
  try {
    await startDependencies(sup, plan);
    savePlan(plan);
    await startRoles(sup, plan);
    keepPairAgentsRunning(sup, plan, writeRoleConfigs(plan), () => stopping);
  } catch (err) {
    say(`lab: ${(err as Error).message}`);
    await sup.stopAll();
    process.exitCode = 1;
    return;
  }
  printWelcome(plan);
  if (opts.tour) {
    const ok = await runTour(plan, { say, pidOf: (name) => sup.get(name)?.pid });
    if (!ok) say('lab: the tour found a problem (see above); the lab stays up for a look.');
  }
  say('The lab stays up; Ctrl-C stops it.');
  await new Promise(() => undefined);
}

export function register(program: Command): void {
  const lab = program.command('lab').description('a whole cluster on this machine, on loopback');
  lab
    .command('up')
    .description('start the lab, run the tour, stay up until Ctrl-C')
    .option('--dir <dir>', 'lab folder (configs, data, logs)', DEFAULT_DIR)
    .option('--no-tour', 'skip the guided tour')
    .option('--users <n>', 'users to create, spread over the pairs', (v) => Number.parseInt(v, 10), 6)
    .option('--instance <n>', `run beside another lab: addresses 127.N.x.1, client ports + N (0-${MAX_INSTANCE})`, (v) => Number.parseInt(v, 10), 0)
    .action(async (o: { dir: string; tour: boolean; users: number; instance: number }) => labUp(o));
  lab
    .command('tour')
    .description('run the tour again against a running lab')
    .option('--dir <dir>', 'lab folder', DEFAULT_DIR)
    .action(async (o: { dir: string }) => {
      const dir = resolve(o.dir);
      const state = runningLab(dir);
      if (!state) throw new Error(`no running lab in ${dir}: start one with \`npm run lab\``);
      const plan = loadPlan(dir);
      const ok = await runTour(plan, { say, pidOf: (name) => state.processes.find((p) => p.name === name)?.pid, refreshPids: () => runningLab(dir) });
      process.exitCode = ok ? 0 : 1;
    });
  lab
    .command('down')
    .description('stop a lab left running')
    .option('--dir <dir>', 'lab folder', DEFAULT_DIR)
    .action(async (o: { dir: string }) => {
      const stopped = await stopFromState(resolve(o.dir));
      say(stopped.length ? `stopped: ${stopped.join(', ')}` : 'no lab process was running');
    });
  lab
    .command('status')
    .description('the status table of the running lab')
    .option('--dir <dir>', 'lab folder', DEFAULT_DIR)
    .action(async (o: { dir: string }) => {
      const plan = loadPlan(resolve(o.dir));
      say(renderStatus(await collectStatus(clusterFile(plan), plan.redis.url)));
    });
}
