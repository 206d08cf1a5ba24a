/**
 * `pairgate <command>`: the one CLI. Each role contributes its sub-commands from its own
 * `cli.ts` (a `register(program)` export), so this file only wires them together and turns
 * errors into one readable line and an exit code (2 for bad config or usage).
 */
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Command, CommanderError } from 'commander';
import { ConfigError, PairgateError } from '../common/errors.ts';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');

/** Command modules, in the order their commands appear in `--help`. */
const COMMAND_MODULES = [
  'loadbalancer/cli.ts',
  'proxy/cli.ts',
  'pair-agent/cli.ts',
  'pair-agent/volume/cli.ts',
  'pair-agent/store/cli.ts',
  'directory/cli.ts',
  'bin/status.ts',
  'bin/maintain.ts',
  'bin/user.ts',
  'bin/lab.ts',
];

/**
 * Which modules a top-level command needs. Loading every role's code costs seconds of start-up
 * (tsx compiles each module), which every `pairgate lb status` and every test that runs the
 * CLI pays; so a known command loads only its own modules. Anything else (help, an unknown or
 * newly added command) loads them all, so this table can lag behind without breaking a command.
 */
const COMMAND_OWNERS: Record<string, string[]> = {
  lb: ['loadbalancer/cli.ts'],
  proxy: ['proxy/cli.ts'],
  'pair-agent': ['pair-agent/cli.ts'],
  pair: ['pair-agent/cli.ts', 'bin/maintain.ts'],
  volume: ['pair-agent/volume/cli.ts'],
  store: ['pair-agent/store/cli.ts'],
  directory: ['directory/cli.ts'],
  status: ['bin/status.ts'],
  user: ['bin/user.ts'],
  lab: ['bin/lab.ts'],
};

export function modulesFor(argv: string[]): string[] {
  const first = argv.find((a) => !a.startsWith('-'));
  const wantsHelp = argv.includes('-h') || argv.includes('--help');
  const owners = first !== undefined && !wantsHelp ? COMMAND_OWNERS[first] : undefined;
  return owners ? COMMAND_MODULES.filter((m) => owners.includes(m)) : COMMAND_MODULES;
}

export type Register = (program: Command) => void;

function fail(err: unknown): never {
  if (err instanceof CommanderError) process.exit(err.exitCode === 0 ? 0 : 2);
  if (err instanceof ConfigError) {
    process.stderr.write(`pairgate: config error: ${err.message}\n`);
    process.exit(2);
  }
  if (err instanceof PairgateError) {
    process.stderr.write(`pairgate: ${err.code}: ${err.message}\n`);
    process.exit(err.code === 'BAD_INPUT' ? 2 : 1);
  }
  // An operating-system refusal (a port in use, a missing file, a refused connection) is the
  // operator's to fix, not a bug: one line naming it, no stack.
  const sys = err as NodeJS.ErrnoException;
  if (sys && typeof sys.syscall === 'string' && typeof sys.code === 'string') {
    process.stderr.write(`pairgate: ${sys.message}\n`);
    process.exit(1);
  }
  process.stderr.write(`pairgate: ${(err as Error)?.stack ?? String(err)}\n`);
  process.exit(1);
}

async function main(): Promise<void> {
  const program = new Command('pairgate')
    .description('Scale-out mail gateway over two-node HA pairs')
    .showHelpAfterError()
    .exitOverride();
  for (const rel of modulesFor(process.argv.slice(2))) {
    const file = join(root, rel);
    if (!existsSync(file)) continue;
    const mod = (await import(pathToFileURL(file).href)) as { register?: Register };
    mod.register?.(program);
  }
  await program.parseAsync(process.argv);
}

main().catch(fail);
