#!/usr/bin/env node
// `npm run bench -- <subject> [args…]`: runs bench/<subject>.ts with the TypeScript loader.
import { existsSync, readdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { register } from 'tsx/esm/api';

const benchDir = join(dirname(fileURLToPath(import.meta.url)), '..', 'bench');
// The issues name some subjects in full; the files use the short names.
const ALIASES = { loadbalancer: 'lb' };
const [named, ...rest] = process.argv.slice(2);
const subject = ALIASES[named] ?? named;
const available = readdirSync(benchDir).filter((f) => f.endsWith('.ts')).map((f) => f.slice(0, -3));
if (!subject || !existsSync(join(benchDir, `${subject}.ts`))) {
  process.stderr.write(`usage: npm run bench -- <subject>\nsubjects: ${available.join(', ') || '(none yet)'}\n`);
  process.exit(2);
}
register();
process.argv = [process.argv[0], join(benchDir, `${subject}.ts`), ...rest];
await import(pathToFileURL(join(benchDir, `${subject}.ts`)).href);
