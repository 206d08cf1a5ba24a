/**
 * An OCF-style command resource, so a pair can manage an external service: the agent runs
 * `<command> start|stop|monitor` with the parameters as OCF_RESKEY_<name> environment variables
 * and reads the OCF exit codes (0 success, 7 not running, anything else an error). Each action
 * has a timeout after which the command is killed and the action counts as failed.
 */
import { spawn } from 'node:child_process';
import { z } from 'zod';
import { durationMs } from '../../common/config.ts';
import { PairgateError } from '../../common/errors.ts';
import type { Logger } from '../../common/log.ts';
import type { MonitorResult, Resource } from '../resource.ts';

export const OCF = { SUCCESS: 0, ERR_GENERIC: 1, ERR_ARGS: 2, ERR_UNIMPLEMENTED: 3, ERR_PERM: 4, ERR_INSTALLED: 5, ERR_CONFIGURED: 6, NOT_RUNNING: 7 } as const;

export const commandResourceSchema = z
  .object({
    type: z.literal('command'),
    name: z.string().regex(/^[A-Za-z0-9_.-]+$/),
    command: z.string().min(1),
    args: z.array(z.string()).default([]),
    params: z.record(z.string(), z.union([z.string(), z.number(), z.boolean()])).default({}),
    timeoutMs: durationMs.default(20_000),
  })
  .strict();

export type CommandResourceConfig = z.output<typeof commandResourceSchema>;

export function killGroup(pid: number | undefined): void {
  if (!pid) return;
  try {
    process.kill(-pid, 'SIGKILL');
  } catch {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
}

export function runOcfAction(config: CommandResourceConfig, action: string): Promise<{ code: number | null; timedOut: boolean; output: string }> {
  return new Promise((resolve) => {
    const env: NodeJS.ProcessEnv = { ...process.env, OCF_RESOURCE_INSTANCE: config.name, OCF_RESOURCE_TYPE: 'pairgate-command' };
    for (const [k, v] of Object.entries(config.params)) env[`OCF_RESKEY_${k}`] = String(v);
    // own process group, so that a timeout kills the command and everything it started
    const child = spawn(config.command, [...config.args, action], { stdio: ['ignore', 'pipe', 'pipe'], env, detached: true });
    let output = '';
    const keep = (b: Buffer) => {
      if (output.length < 4000) output += b.toString();
    };
    child.stdout.on('data', keep);
    child.stderr.on('data', keep);
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      killGroup(child.pid);
      // a grandchild may keep the pipes open: do not wait for them after a kill
      setTimeout(() => resolve({ code: null, timedOut: true, output: output.trim() }), 200).unref();
    }, config.timeoutMs);
    child.once('error', (err) => {
      clearTimeout(timer);
      resolve({ code: null, timedOut: false, output: err.message });
    });
    child.once('close', (code) => {
      clearTimeout(timer);
      resolve({ code, timedOut, output: output.trim() });
    });
  });
}

export class CommandResource implements Resource {
  readonly name: string;
  constructor(private readonly config: CommandResourceConfig, private readonly log: Logger) {
    this.name = config.name;
  }

  private async run(action: 'start' | 'stop' | 'monitor') {
    const r = await runOcfAction(this.config, action);
    if (r.output) this.log.debug({ resource: this.name, action, code: r.code, output: r.output.slice(0, 500) }, 'command resource output');
    return r;
  }

  async start(): Promise<void> {
    const r = await this.run('start');
    if (r.timedOut) throw new PairgateError('TIMEOUT', `${this.name} start timed out after ${this.config.timeoutMs} ms`, true);
    if (r.code !== OCF.SUCCESS) throw new PairgateError('UNAVAILABLE', `${this.name} start exited ${r.code}`, true);
  }

  async stop(): Promise<void> {
    const r = await this.run('stop');
    if (r.timedOut) throw new PairgateError('TIMEOUT', `${this.name} stop timed out after ${this.config.timeoutMs} ms`, true);
    if (r.code !== OCF.SUCCESS && r.code !== OCF.NOT_RUNNING) throw new PairgateError('UNAVAILABLE', `${this.name} stop exited ${r.code}`, true);
  }

  async monitor(): Promise<MonitorResult> {
    const r = await this.run('monitor');
    if (r.timedOut) return 'failed';
    if (r.code === OCF.SUCCESS) return 'running';
    if (r.code === OCF.NOT_RUNNING) return 'stopped';
    return 'failed';
  }
}
