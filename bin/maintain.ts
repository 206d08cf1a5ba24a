/**
 * `pairgate pair maintain <pair> --node a -- <command>`: rolling maintenance of one node, the
 * safe sequence an operator would otherwise type by hand:
 *   1. if the node holds the resources, hand them to its peer and wait until the peer serves
 *      and replication is connected again;
 *   2. run the command for the freed node (an upgrade, a reboot script);
 *   3. wait for the node to rejoin and resync (progress on a terminal);
 *   4. with --hand-back, move the resources back and wait again.
 * The proxies hold new logins and deliveries while the pair is `failing-over`, so clients
 * see a pause, never a failure.
 */
import { spawn } from 'node:child_process';
import type { Command } from 'commander';
import cliProgress from 'cli-progress';
import { adminCall } from '../common/admin-http.ts';
import type { HealthRecord } from '../common/health.ts';
import { readClusterFile, type ClusterFile } from './status.ts';
import { sleep } from './lab/wait.ts';

type NodeId = 'a' | 'b';

export interface MaintainOptions {
  cluster: ClusterFile;
  pair: string;
  node: NodeId;
  command: string[];
  handBack: boolean;
  token?: string | undefined;
  timeoutMs: number;
  say(line: string): void;
}

async function health(url: string): Promise<HealthRecord | null> {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(1000) });
    return (await res.json()) as HealthRecord;
  } catch {
    return null;
  }
}

/** Serving from `primary`, both nodes up, replication (if any) connected with nothing out of sync. */
function settledOn(h: HealthRecord | null, primary: NodeId): boolean {
  if (!h || h.state !== 'ok' || h.primary !== primary) return false;
  const peer: NodeId = primary === 'a' ? 'b' : 'a';
  const peerNode = h.nodes[peer];
  // A pair on a shared disk has no replication to wait for: the peer being back is enough.
  if (h.replication.connection === 'none') return peerNode !== undefined && peerNode.heartbeat === 'up';
  return (
    h.replication.connection === 'Connected' &&
    h.replication.outOfSyncBytes === 0 &&
    peerNode !== undefined &&
    peerNode.heartbeat === 'up' &&
    peerNode.disk === 'UpToDate'
  );
}

async function waitSettled(url: string, primary: NodeId, what: string, opts: MaintainOptions): Promise<void> {
  const start = Date.now();
  const bar = process.stdout.isTTY
    ? new cliProgress.SingleBar({ format: `  ${what} [{bar}] {percentage}% | {value}/{total} bytes to resync | {state}` }, cliProgress.Presets.shades_classic)
    : null;
  let maxOutOfSync = 0;
  let last = '';
  try {
    for (;;) {
      const h = await health(url);
      if (settledOn(h, primary)) break;
      const oos = h?.replication.outOfSyncBytes ?? 0;
      maxOutOfSync = Math.max(maxOutOfSync, oos);
      const state = h ? `${h.state}, primary ${h.primary ?? 'none'}, replication ${h.replication.connection}` : 'no answer';
      if (bar) {
        if (maxOutOfSync > 0 && !bar.isActive) bar.start(maxOutOfSync, 0, { state });
        if (bar.isActive) {
          bar.setTotal(maxOutOfSync);
          bar.update(maxOutOfSync - oos, { state });
        }
      } else if (state !== last) {
        opts.say(`  +${((Date.now() - start) / 1000).toFixed(1)} s ${state}${oos ? `, ${oos} bytes out of sync` : ''}`);
      }
      last = state;
      if (Date.now() - start > opts.timeoutMs) throw new Error(`${opts.pair}: ${what} did not finish within ${opts.timeoutMs / 1000} s (last: ${last})`);
      await sleep(200);
    }
  } finally {
    bar?.stop();
  }
  opts.say(`  ${what}: done in ${((Date.now() - start) / 1000).toFixed(1)} s`);
}

async function nodeAction(adminUrl: string, action: 'standby' | 'takeover', opts: MaintainOptions): Promise<void> {
  const res = await adminCall(adminUrl, 'POST', `/${action}`, {}, { token: opts.token });
  if (res.status >= 300) throw new Error(`${action} at ${adminUrl} refused: ${JSON.stringify(res.body)}`);
}

function runCommand(command: string[], env: NodeJS.ProcessEnv): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn(command[0]!, command.slice(1), { stdio: 'inherit', env: { ...process.env, ...env } });
    child.once('error', reject);
    child.once('exit', (code, signal) => resolve(code ?? (signal ? 128 : 1)));
  });
}

export async function maintainPair(opts: MaintainOptions): Promise<void> {
  const pair = opts.cluster.pairs?.find((p) => p.id === opts.pair);
  if (!pair) throw new Error(`pair ${opts.pair} is not in the cluster file`);
  const peer: NodeId = opts.node === 'a' ? 'b' : 'a';
  const nodeUrl = (n: NodeId) => {
    const url = pair.nodes?.find((x) => x.node === n)?.adminUrl;
    if (!url) throw new Error(`the cluster file gives no admin URL for ${opts.pair} node ${n}`);
    return url;
  };
  const h = await health(pair.healthUrl);
  if (!h) throw new Error(`${opts.pair} does not answer at ${pair.healthUrl}`);
  const original = h.primary;
  opts.say(`${opts.pair}: ${h.state}, primary ${original ?? 'none'}; maintaining node ${opts.node}`);

  opts.say(`step 1/4: free node ${opts.node}`);
  if (h.primary === opts.node) {
    await nodeAction(nodeUrl(opts.node), 'standby', opts);
    await waitSettled(pair.healthUrl, peer, `switch to node ${peer}`, opts);
  } else {
    await waitSettled(pair.healthUrl, peer, `node ${peer} serving and in sync`, opts);
  }

  opts.say(`step 2/4: run \`${opts.command.join(' ')}\` for node ${opts.node}`);
  const code = await runCommand(opts.command, { PAIRGATE_PAIR: opts.pair, PAIRGATE_NODE: opts.node, PAIRGATE_NODE_ADMIN: nodeUrl(opts.node) });
  if (code !== 0) throw new Error(`the maintenance command exited with ${code}; node ${peer} keeps serving, node ${opts.node} is left as it is`);

  opts.say(`step 3/4: wait for node ${opts.node} to rejoin and resync`);
  await waitSettled(pair.healthUrl, peer, `node ${opts.node} rejoined and resynced`, opts);

  if (opts.handBack && original === opts.node) {
    opts.say(`step 4/4: hand the resources back to node ${opts.node}`);
    await nodeAction(nodeUrl(peer), 'standby', opts);
    await waitSettled(pair.healthUrl, opts.node, `switch back to node ${opts.node}`, opts);
  } else {
    opts.say(`step 4/4: node ${peer} keeps the resources${opts.handBack ? '' : ' (use --hand-back to move them back)'}`);
  }
  opts.say(`${opts.pair}: maintenance of node ${opts.node} done`);
}

export function register(program: Command): void {
  const pair = program.commands.find((c) => c.name() === 'pair') ?? program.command('pair').description('operate a pair');
  pair
    .command('maintain')
    .description('rolling maintenance of one node: free it, run a command, wait for rejoin and resync')
    .argument('<pair>', 'pair id, e.g. pair-01')
    .requiredOption('--node <node>', 'the node to maintain: a or b')
    .option('--cluster <file>', 'cluster file (the lab writes lab/cluster.json)', 'lab/cluster.json')
    .option('--token-env <var>', 'environment variable holding the pair-agents\' admin token', 'PAIRGATE_ADMIN_TOKEN')
    .option('--hand-back', 'move the resources back to the node afterwards', false)
    .option('--timeout <seconds>', 'bound for each wait', (v) => Number.parseInt(v, 10), 300)
    .argument('<command...>', 'the command to run for the freed node (after --)')
    .action(async (pairId: string, command: string[], o: { node: string; cluster: string; tokenEnv: string; handBack: boolean; timeout: number }) => {
      if (o.node !== 'a' && o.node !== 'b') throw new Error(`--node must be a or b, not ${o.node}`);
      const cluster = readClusterFile(o.cluster);
      await maintainPair({
        cluster,
        pair: pairId,
        node: o.node,
        command,
        handBack: o.handBack,
        token: process.env[o.tokenEnv] ?? cluster.adminToken,
        timeoutMs: o.timeout * 1000,
        say: (line) => process.stdout.write(`${line}\n`),
      });
    });
}
