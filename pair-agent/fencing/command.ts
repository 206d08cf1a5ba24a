/**
 * A fence-agents compatible command: the options go to the program's stdin as `key=value` lines,
 * as the `fence_*` programs read them (`action=off`, `ip=…`, `plug=…`, …); exit 0 = done. A
 * command that hangs is killed at the timeout and counted as failed. With `confirm`, an `off`
 * is followed by `action=status`, which fence-agents answer with exit 2 when the target is off.
 */
import { spawn } from 'node:child_process';
import type { Logger } from '../../common/log.ts';
import type { FenceDevice, FenceOutcome } from './types.ts';
import { killGroup } from '../resources/command.ts';

export interface CommandFenceOptions {
  command: string;
  args: string[];
  /** Extra `key=value` options (e.g. ip, username, password, plug). */
  options: Record<string, string | number | boolean>;
  timeoutMs: number;
  confirm: boolean;
  log: Logger;
}

/** Formats the stdin of a fence agent; refuses values that would break the line format. */
export function fenceAgentInput(action: string, options: Record<string, string | number | boolean>): string {
  const lines = [`action=${action}`];
  for (const [k, v] of Object.entries(options)) {
    const value = String(v);
    if (!/^[A-Za-z0-9_-]+$/.test(k) || /[\r\n]/.test(value)) throw new Error(`fence option ${k} has a name or value that cannot go on one line`);
    lines.push(`${k}=${value}`);
  }
  return `${lines.join('\n')}\n`;
}

export function runFenceAgent(opts: CommandFenceOptions, action: string, signal: AbortSignal): Promise<{ code: number | null; timedOut: boolean; stderr: string }> {
  return new Promise((resolve) => {
    let input: string;
    try {
      input = fenceAgentInput(action, opts.options);
    } catch (err) {
      resolve({ code: null, timedOut: false, stderr: (err as Error).message });
      return;
    }
    // own process group, so that a timeout kills the agent and everything it started
    const child = spawn(opts.command, opts.args, { stdio: ['pipe', 'ignore', 'pipe'], detached: true });
    let stderr = '';
    let timedOut = false;
    child.stderr.on('data', (b: Buffer) => {
      if (stderr.length < 2000) stderr += b.toString();
    });
    const kill = () => {
      killGroup(child.pid);
      // a grandchild may keep stderr open: do not wait for it after a kill
      setTimeout(() => resolve({ code: null, timedOut: true, stderr: stderr.trim() }), 200).unref();
    };
    const timer = setTimeout(() => {
      timedOut = true;
      kill();
    }, opts.timeoutMs);
    const onAbort = () => {
      timedOut = true;
      kill();
    };
    signal.addEventListener('abort', onAbort, { once: true });
    child.once('error', (err) => {
      clearTimeout(timer);
      signal.removeEventListener('abort', onAbort);
      resolve({ code: null, timedOut: false, stderr: err.message });
    });
    child.once('close', (code) => {
      clearTimeout(timer);
      signal.removeEventListener('abort', onAbort);
      resolve({ code, timedOut, stderr: stderr.trim() });
    });
    child.stdin.on('error', () => undefined);
    child.stdin.end(input);
  });
}

export class CommandFenceDevice implements FenceDevice {
  readonly kind = 'command';
  constructor(private readonly opts: CommandFenceOptions) {}

  async fence(action: 'off' | 'reboot', signal: AbortSignal): Promise<FenceOutcome> {
    const r = await runFenceAgent(this.opts, action, signal);
    if (r.timedOut) return { outcome: 'timeout', detail: `${this.opts.command} action=${action} killed after ${this.opts.timeoutMs} ms` };
    if (r.code !== 0) return { outcome: 'failed', detail: `${this.opts.command} action=${action} exited ${r.code ?? 'abnormally'}${r.stderr ? `: ${r.stderr.split('\n')[0]}` : ''}` };
    if (action === 'off' && this.opts.confirm) {
      const s = await runFenceAgent(this.opts, 'status', signal);
      if (s.timedOut) return { outcome: 'timeout', detail: `${this.opts.command} action=status timed out after off` };
      if (s.code !== 2) return { outcome: 'failed', detail: `${this.opts.command} action=status exited ${s.code} after off (2 = off expected)` };
    }
    return { outcome: 'ok', detail: `${this.opts.command} action=${action} done` };
  }
}
