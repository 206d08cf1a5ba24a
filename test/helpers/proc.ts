/**
 * Child processes for tests: real servers and pair-agents, started in the background, their
 * output kept for failure messages, and all of them killed when the test process exits so
 * that nothing is left running.
 */
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface Managed {
  child: ChildProcess;
  name: string;
  output(): string;
  alive(): boolean;
  /** SIGTERM, then SIGKILL after graceMs; resolves when the process is gone. */
  stop(graceMs?: number): Promise<void>;
  kill(signal?: NodeJS.Signals): void;
  exited: Promise<number | null>;
}

const running = new Set<ChildProcess>();
process.on('exit', () => {
  for (const c of running) {
    try {
      c.kill('SIGKILL');
    } catch {
      // already gone
    }
  }
});

export function startProcess(name: string, cmd: string, args: string[], opts: SpawnOptions = {}): Managed {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], ...opts });
  running.add(child);
  let out = '';
  const keep = (b: Buffer) => {
    out += b.toString();
    if (out.length > 200_000) out = out.slice(-100_000);
  };
  child.stdout?.on('data', keep);
  child.stderr?.on('data', keep);
  let exitCode: number | null | undefined;
  const exited = new Promise<number | null>((resolve) => {
    child.once('exit', (code, signal) => {
      exitCode = code ?? (signal ? -1 : null);
      running.delete(child);
      resolve(exitCode);
    });
    child.once('error', (err) => {
      out += `spawn error: ${err.message}\n`;
      exitCode = -1;
      running.delete(child);
      resolve(-1);
    });
  });
  return {
    child,
    name,
    exited,
    output: () => out,
    alive: () => exitCode === undefined,
    kill: (signal = 'SIGKILL') => {
      if (exitCode === undefined) child.kill(signal);
    },
    stop: async (graceMs = 3000) => {
      if (exitCode !== undefined) return;
      child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), graceMs);
      await exited;
      clearTimeout(t);
    },
  };
}

/** A temp dir removed by the returned cleanup (and left behind only if the process dies hard). */
export function tempDir(prefix = 'pairgate-test-'): { path: string; cleanup(): void } {
  const path = mkdtempSync(join(tmpdir(), prefix));
  return { path, cleanup: () => rmSync(path, { recursive: true, force: true }) };
}
