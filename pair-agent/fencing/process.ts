/**
 * The lab's fencing device: the peer is a process on this host, found by its pid file (or a fixed
 * pid). `off`/`reboot` send SIGKILL and resolve `ok` only once the process is gone (no such pid,
 * or a zombie waiting for its parent). A pid file that names no process counts as already off
 * when `missingIsOff` (the peer died and was not restarted); otherwise as a failure.
 */
import { readFileSync } from 'node:fs';
import type { FenceDevice, FenceOutcome } from './types.ts';

export interface ProcessFenceOptions {
  pidFile?: string | undefined;
  pid?: number | undefined;
  /** A string the target's command line must contain, so a recycled pid is never killed. */
  match?: string | undefined;
  timeoutMs: number;
  missingIsOff: boolean;
}

export function processState(pid: number): 'running' | 'zombie' | 'gone' {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    return state === 'Z' || state === 'X' ? 'zombie' : 'running';
  } catch {
    try {
      process.kill(pid, 0);
      return 'running';
    } catch (err) {
      return (err as NodeJS.ErrnoException).code === 'EPERM' ? 'running' : 'gone';
    }
  }
}

function cmdline(pid: number): string | null {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0/g, ' ');
  } catch {
    return null;
  }
}

export class ProcessFenceDevice implements FenceDevice {
  readonly kind = 'process';
  constructor(private readonly opts: ProcessFenceOptions) {}

  private targetPid(): number | null {
    if (this.opts.pid) return this.opts.pid;
    if (!this.opts.pidFile) return null;
    try {
      const n = Number.parseInt(readFileSync(this.opts.pidFile, 'utf8').trim(), 10);
      return Number.isInteger(n) && n > 1 ? n : null;
    } catch {
      return null;
    }
  }

  isCertainlyOff(): boolean {
    const pid = this.targetPid();
    if (pid === null) return this.opts.missingIsOff;
    return pid !== process.pid && processState(pid) !== 'running';
  }

  async fence(_action: 'off' | 'reboot', signal: AbortSignal): Promise<FenceOutcome> {
    const pid = this.targetPid();
    if (pid === null || pid === process.pid) {
      return this.opts.missingIsOff && pid === null
        ? { outcome: 'ok', detail: `no pid in ${this.opts.pidFile}: peer process is off` }
        : { outcome: 'failed', detail: pid === null ? `no pid in ${this.opts.pidFile}` : 'refusing to fence myself' };
    }
    if (processState(pid) !== 'running') return { outcome: 'ok', detail: `peer process ${pid} is already gone` };
    if (this.opts.match) {
      const cmd = cmdline(pid);
      if (cmd !== null && !cmd.includes(this.opts.match)) return { outcome: 'failed', detail: `pid ${pid} is not the peer (command line does not match)` };
    }
    try {
      process.kill(pid, 'SIGKILL');
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code !== 'ESRCH') return { outcome: 'failed', detail: `kill ${pid}: ${code}` };
    }
    const deadline = Date.now() + this.opts.timeoutMs;
    while (Date.now() < deadline && !signal.aborted) {
      if (processState(pid) !== 'running') return { outcome: 'ok', detail: `peer process ${pid} killed and gone` };
      await new Promise((r) => setTimeout(r, 10));
    }
    return { outcome: 'timeout', detail: `peer process ${pid} still there after SIGKILL` };
  }
}
