#!/usr/bin/env node
// Builds the proxy's native relay (common/native, a N-API addon for Linux) with node-gyp, against
// the headers of the Node.js that runs this script. Run by `npm ci` (postinstall) and by hand with
// `npm run build:native`. A failed build is not fatal: the proxy then relays spliced sessions in
// JavaScript and says so in its start-up log. `--strict` makes a failure the exit status.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const strict = process.argv.includes('--strict');
const dir = join(dirname(fileURLToPath(import.meta.url)), '..', 'common', 'native');

function say(msg) {
  process.stderr.write(`build-native: ${msg}\n`);
}

if (process.platform !== 'linux') {
  say(`skipped on ${process.platform} (the native relay is Linux-only; the proxy uses its JavaScript relay)`);
  process.exit(0);
}

// npm gives its scripts the node-gyp it bundles; run by hand, find it beside npm.
function findNodeGyp() {
  if (process.env.npm_config_node_gyp && existsSync(process.env.npm_config_node_gyp)) return process.env.npm_config_node_gyp;
  const npmDir = join(dirname(process.execPath), '..', 'lib', 'node_modules', 'npm');
  for (const base of [npmDir, '/usr/lib/node_modules/npm', '/usr/local/lib/node_modules/npm']) {
    const f = join(base, 'node_modules', 'node-gyp', 'bin', 'node-gyp.js');
    if (existsSync(f)) return f;
  }
  try {
    return createRequire(import.meta.url).resolve('node-gyp/bin/node-gyp.js');
  } catch {
    return null;
  }
}

const gyp = findNodeGyp();
if (!gyp) {
  say('node-gyp not found (it comes with npm): the proxy will use its JavaScript relay');
  process.exit(strict ? 1 : 0);
}
// The headers of the running Node (Debian's nodejs-dev layout: <prefix>/include/node); else node-gyp fetches them.
const prefix = join(dirname(process.execPath), '..');
const args = [gyp, 'rebuild', '--loglevel=warn'];
if (existsSync(join(prefix, 'include', 'node', 'node_api.h'))) args.push(`--nodedir=${prefix}`);
const started = Date.now();
const r = spawnSync(process.execPath, args, { cwd: dir, stdio: ['ignore', 'inherit', 'inherit'] });
const built = join(dir, 'build', 'Release', 'pairgate_relay.node');
if (r.status === 0 && existsSync(built)) {
  say(`built ${built} in ${Date.now() - started} ms`);
  process.exit(0);
}
say(`failed (exit ${r.status ?? r.signal}): the proxy will use its JavaScript relay; needs python3, make and a C compiler`);
process.exit(strict ? 1 : 0);
