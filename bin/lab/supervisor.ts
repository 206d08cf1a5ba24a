/**
 * The lab's process supervisor: every role runs as a real child process with its own log file
 * under the lab folder, its pid recorded in `lab/state.json` so that `pairgate lab down` can
 * stop a lab left running by another shell, and everything stopped in reverse start order.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO_ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const PAIRGATE_BIN = join(REPO_ROOT, 'bin', 'pairgate.mjs');

export interface LabProcess {
  name: string;
  pid: number;
  logFile: string;
  child: ChildProcess;
  exited: Promise<number | null>;
  alive(): boolean;
}

export interface LabState {
  dir: string;
  startedAt: number;
  processes: Array<{ name: string; pid: number; logFile: string }>;
  [extra: string]: unknown;
}

export class Supervisor {
  readonly processes: LabProcess[] = [];
  private stopping = false;

  constructor(readonly dir: string, private readonly extraState: Record<string, unknown> = {}) {
    mkdirSync(join(dir, 'logs'), { recursive: true });
  }

  get stateFile(): string {
    return join(this.dir, 'state.json');
  }

  /** Starts `pairgate <args>` (or any command with `cmd`) with output to logs/<name>.log. */
  start(name: string, args: string[], opts: { cmd?: string; env?: NodeJS.ProcessEnv; cwd?: string } = {}): LabProcess {
    const logFile = join(this.dir, 'logs', `${name}.log`);
    const fd = openSync(logFile, 'a');
    const cmd = opts.cmd ?? process.execPath;
    const argv = opts.cmd ? args : [PAIRGATE_BIN, ...args];
    const child = spawn(cmd, argv, {
      cwd: opts.cwd ?? REPO_ROOT,
      env: { ...process.env, ...opts.env },
      stdio: ['ignore', fd, fd],
      // Own process group, so that Ctrl-C in the lab's terminal reaches only the lab, which
      // then stops its children in order.
      detached: true,
    });
    closeSync(fd);
    let done = false;
    const exited = new Promise<number | null>((resolve) => {
      child.once('exit', (code) => {
        done = true;
        resolve(code);
      });
      child.once('error', () => {
        done = true;
        resolve(-1);
      });
    });
    const proc: LabProcess = { name, pid: child.pid ?? -1, logFile, child, exited, alive: () => !done };
    this.processes.push(proc);
    this.saveState();
    return proc;
  }

  get(name: string): LabProcess | undefined {
    return [...this.processes].reverse().find((p) => p.name === name);
  }

  saveState(extra: Record<string, unknown> = {}): void {
    Object.assign(this.extraState, extra);
    const state: LabState = {
      ...this.extraState,
      dir: this.dir,
      startedAt: Date.now(),
      processes: this.processes.filter((p) => p.alive()).map((p) => ({ name: p.name, pid: p.pid, logFile: p.logFile })),
    };
    writeFileSync(this.stateFile, JSON.stringify(state, null, 2));
  }

  /** Stops every process, newest first: SIGTERM, then SIGKILL after graceMs. */
  async stopAll(graceMs = 8000): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    for (const p of [...this.processes].reverse()) await stopOne(p, graceMs);
    this.saveState();
  }
}

async function stopOne(p: LabProcess, graceMs: number): Promise<void> {
  if (!p.alive()) return;
  try {
    process.kill(p.pid, 'SIGTERM');
  } catch {
    return;
  }
  const timer = setTimeout(() => {
    try {
      process.kill(p.pid, 'SIGKILL');
    } catch {
      // gone already
    }
  }, graceMs);
  await p.exited;
  clearTimeout(timer);
}

export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Stops the processes a lab recorded in its state file (for `pairgate lab down`). */
export async function stopFromState(dir: string, graceMs = 8000): Promise<string[]> {
  const file = join(dir, 'state.json');
  if (!existsSync(file)) return [];
  const state = JSON.parse(readFileSync(file, 'utf8')) as LabState;
  const stopped: string[] = [];
  for (const p of [...state.processes].reverse()) {
    if (!pidAlive(p.pid)) continue;
    try {
      process.kill(p.pid, 'SIGTERM');
    } catch {
      continue;
    }
    const deadline = Date.now() + graceMs;
    while (pidAlive(p.pid) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    if (pidAlive(p.pid)) process.kill(p.pid, 'SIGKILL');
    stopped.push(p.name);
  }
  state.processes = [];
  writeFileSync(file, JSON.stringify(state, null, 2));
  return stopped;
}
