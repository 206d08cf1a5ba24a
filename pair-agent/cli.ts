/**
 * `pairgate pair-agent --config FILE`: runs one node of a pair until SIGTERM/SIGINT (a clean
 * stop releases the resources and tells the peer, which then takes over without waiting for
 * deadtime).
 *
 * `pairgate pair status|standby|takeover|maintenance on|off (--config FILE | --admin URL)`:
 * operator commands through the node's admin API (loopback needs no token; otherwise the
 * bearer token from the config, --token-env, or $PAIRGATE_ADMIN_TOKEN).
 */
import type { Command } from 'commander';
import { adminCall } from '../common/admin-http.ts';
import { readFileSync } from 'node:fs';
import { loadConfigFile, parseYaml, validateConfig } from '../common/config.ts';
import { ConfigError, PairgateError } from '../common/errors.ts';
import { installLifecycle } from '../common/lifecycle.ts';
import { createLogger } from '../common/log.ts';
import { createRegistry } from '../common/metrics.ts';
import { pairAgentConfigSchema, startPairAgent, type PairAgentStatus } from './agent.ts';

interface TargetOpts {
  config?: string;
  admin?: string;
  tokenEnv: string;
  json?: boolean;
}

function target(o: TargetOpts): { url: string; token: string | undefined } {
  if (o.admin) return { url: o.admin, token: process.env[o.tokenEnv] };
  if (!o.config) throw new PairgateError('BAD_INPUT', 'give --config FILE (the node\'s pair-agent config) or --admin URL', false);
  // Only the admin section is needed (and expanded): the operator need not hold the heartbeat key.
  let text: string;
  try {
    text = readFileSync(o.config, 'utf8');
  } catch (err) {
    throw new ConfigError('', `cannot read config file ${o.config}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
  }
  const raw = parseYaml(text, o.config) as { admin?: unknown } | null;
  const admin = validateConfig(pairAgentConfigSchema.innerType().shape.admin, (raw ?? {}).admin, o.config);
  const c = { admin };
  const [host, port] = [c.admin.listen.replace(/:\d+$/, ''), c.admin.listen.replace(/^.*:/, '')];
  if (port === '0') throw new PairgateError('BAD_INPUT', `${o.config}: admin.listen has port 0; give --admin URL`, false);
  const h = host === '0.0.0.0' ? '127.0.0.1' : host === '::' || host === '[::]' ? '[::1]' : host;
  return { url: `http://${h}:${port}`, token: c.admin.token ?? process.env[o.tokenEnv] };
}

function render(s: PairAgentStatus): string {
  const h = s.health;
  const lines = [
    `pair ${s.pair} node ${s.node}: ${s.state}${s.holds ? ' (holds the resources)' : ''}${s.maintenance ? ' [maintenance]' : ''}${s.unclean ? ' UNCLEAN: a resource did not stop (the peer fences this node before taking over)' : ''}`,
    `  pair state ${h.state}, primary ${h.primary ?? 'none'}, fencing ${s.fencing}${s.fencingDetail ? ` (${s.fencingDetail})` : ''}`,
    `  peer: ${s.peer.alive ? 'alive' : s.peer.everSeen ? 'dead' : 'never seen'}${s.peer.state ? `, ${s.peer.state}` : ''}; links ${s.peer.links.map((l) => `${l.peer} ${l.up ? 'up' : 'down'}`).join(', ')}`,
    `  request ${s.request}, ping ${s.ping ? 'ok' : 'no target reachable'}, resources ${s.resources.join(' -> ')}`,
  ];
  return `${lines.join('\n')}\n`;
}

async function call(o: TargetOpts, method: 'GET' | 'POST', path: string, body?: unknown): Promise<void> {
  const t = target(o);
  let res: { status: number; body: unknown };
  try {
    res = await adminCall(t.url, method, path, body, { token: t.token, timeoutMs: 5000 });
  } catch (err) {
    throw new PairgateError('UNAVAILABLE', `cannot reach the pair-agent at ${t.url}: ${(err as Error).message}`, true);
  }
  if (res.status >= 300) {
    const b = res.body as { error?: string; message?: string };
    throw new PairgateError(res.status === 409 ? 'CONFLICT' : 'UNAVAILABLE', `${path.slice(1)} refused (${res.status}): ${b?.message ?? JSON.stringify(res.body)}`, false);
  }
  process.stdout.write(o.json ? `${JSON.stringify(res.body, null, 2)}\n` : render(res.body as PairAgentStatus));
}

export function register(program: Command): void {
  program
    .command('pair-agent')
    .description('run one node of an HA pair: heartbeat, fencing, floating IP, resources, health')
    .requiredOption('-c, --config <file>', 'pair-agent config file (YAML)')
    .action(async (opts: { config: string }) => {
      const config = loadConfigFile(pairAgentConfigSchema, opts.config);
      const log = createLogger({ role: 'pair-agent', level: config.logLevel });
      const registry = createRegistry({ role: 'pair-agent', pair: config.pair, node: config.node });
      const agent = await startPairAgent(config, { log, registry });
      installLifecycle({ log, stop: () => agent.stop(), reload: () => agent.reload(loadConfigFile(pairAgentConfigSchema, opts.config)), stopTimeoutMs: 15_000 });
    });

  const pair = program.commands.find((c) => c.name() === 'pair') ?? program.command('pair').description('operate a pair');
  const withTarget = (cmd: Command) =>
    cmd
      .option('-c, --config <file>', 'the node\'s pair-agent config (its admin address and token)')
      .option('--admin <url>', 'the node\'s admin URL, e.g. http://127.0.0.1:9026')
      .option('--token-env <var>', 'environment variable holding the admin token', 'PAIRGATE_ADMIN_TOKEN')
      .option('--json', 'print the raw JSON answer');
  withTarget(pair.command('status').description('state of the node and of the pair as it sees them')).action((o: TargetOpts) => call(o, 'GET', '/status'));
  withTarget(pair.command('standby').description('hand the resources to the peer (and stay standby while the peer is up)')).action((o: TargetOpts) => call(o, 'POST', '/standby'));
  withTarget(pair.command('takeover').description('take the resources from the peer (it releases them first)')).action((o: TargetOpts) => call(o, 'POST', '/takeover'));
  withTarget(pair.command('maintenance').description('stop managing the resources (leave everything as it is), or resume').argument('<on|off>')).action(
    (mode: string, o: TargetOpts) => {
      if (mode !== 'on' && mode !== 'off') throw new PairgateError('BAD_INPUT', `maintenance takes on or off, not ${mode}`, false);
      return call(o, 'POST', '/maintenance', { on: mode === 'on' });
    },
  );
}
