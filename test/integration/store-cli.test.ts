/**
 * `pairgate store serve|check|stats|compact` as an operator runs them: serve a volume file,
 * deliver with `swaks --protocol LMTP`, read the admin /health, stop with SIGTERM (final
 * checkpoint), then check (clean, exit 0), stats, compact; a corrupted body makes check exit 1.
 * On a terminal (a pty made by `script`), check and compact draw a progress bar. Bad input: a
 * missing file, a file that is not a store, a bad --rate: a one-line error and exit 1/2, never a
 * stack trace; `format` asks for --yes and then leaves a store that checks clean.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, describe, expect, it } from 'vitest';
import { freePort, waitForPort } from '../helpers/net.ts';
import { startProcess, tempDir, type Managed } from '../helpers/proc.ts';
import { FileBlockDevice } from '../../pair-agent/volume/block-device.ts';

const run = promisify(execFile);
const cli = join(process.cwd(), 'bin/pairgate.mjs');
const dir = tempDir('pairgate-store-cli-');
let proc: Managed | undefined;

afterAll(async () => {
  await proc?.stop(3000);
  dir.cleanup();
});

describe('pairgate store CLI', () => {
  it('serves, takes swaks LMTP deliveries, stops cleanly; check/stats/compact work on the volume', async () => {
    const [lmtp, pop3, imap, admin] = [await freePort(), await freePort(), await freePort(), await freePort()];
    const vol = join(dir.path, 'store.img');
    const cfg = join(dir.path, 'store.yaml');
    writeFileSync(
      cfg,
      `volume: { path: ${vol}, sizeBytes: 33554432 }\nlistenHost: 127.0.0.1\nadmin: { host: 127.0.0.1, port: ${admin} }\nlog: { level: warn }\n` +
        `store:\n  ports: { lmtp: ${lmtp}, pop3: ${pop3}, imap: ${imap} }\n  masterUser: m\n  masterSecret: \${STORE_TEST_SECRET}\n`,
    );
    proc = startProcess('store', process.execPath, [cli, 'store', 'serve', '--config', cfg], { env: { ...process.env, STORE_TEST_SECRET: 'secret-for-test' } });
    await waitForPort('127.0.0.1', admin, 20_000, () => proc!.alive());
    for (let i = 0; i < 3; i++) {
      const r = await run('swaks', ['--protocol', 'LMTP', '--server', `127.0.0.1:${lmtp}`, '--to', 'carol@pair-01,dave@pair-01', '--from', 'x@example.net', '--header', `Subject: swaks ${i}`, '--timeout', '10'], { timeout: 20_000 });
      expect(r.stdout.match(/^<- +250 2\.6\.0 /gm)?.length).toBe(2);
    }
    const health = (await (await fetch(`http://127.0.0.1:${admin}/health`)).json()) as { messages: number; running: boolean; deliveryLatencyMs: { samples: number } };
    expect(health).toMatchObject({ running: true, messages: 6, deliveryLatencyMs: { samples: 3 } });
    const metrics = await (await fetch(`http://127.0.0.1:${admin}/metrics`)).text();
    expect(metrics).toMatch(/pairgate_deliveries_total\{[^}]*result="ok"[^}]*\} 6/);
    proc.kill('SIGTERM');
    expect(await proc.exited).toBe(0);
    proc = undefined;

    const stats = JSON.parse((await run(process.execPath, [cli, 'store', 'stats', '--volume', vol, '--json'], { timeout: 20_000 })).stdout) as { messages: number; mailboxes: number; bodyBytes: number };
    expect(stats).toMatchObject({ messages: 6, mailboxes: 12 });
    const check = await run(process.execPath, [cli, 'store', 'check', '--volume', vol], { timeout: 20_000 });
    expect(check.stdout).toMatch(/no problems found/);
    const compact = await run(process.execPath, [cli, 'store', 'compact', '--volume', vol], { timeout: 20_000 });
    expect(compact.stdout).toMatch(/segments free/);

    // Damage a stored body: check reports it and exits 1.
    const dev = await FileBlockDevice.open(vol);
    const data = await dev.read(0, 4 * 1024 * 1024);
    const at = data.indexOf(Buffer.from('Subject: swaks 1'));
    expect(at).toBeGreaterThan(0);
    const blockStart = at - (at % 4096);
    const blk = await dev.read(blockStart, 4096);
    blk[at - blockStart + 3] ^= 0x20;
    await dev.write(blockStart, blk);
    await dev.close();
    const bad = await run(process.execPath, [cli, 'store', 'check', '--volume', vol], { timeout: 20_000 }).then(
      () => null,
      (e: { code: number; stdout: string }) => e,
    );
    expect(bad?.code).toBe(1);
    expect(bad?.stdout).toMatch(/problems \(\d+\)/);
  }, 60_000);

  it('draws a progress bar on a terminal; bad input gets a one-line error; format asks for --yes', async () => {
    const vol = join(dir.path, 'bar.img');
    const dev = await FileBlockDevice.open(vol, { size: 16 * 1024 * 1024, create: true });
    const { openMailStore } = await import('../../pair-agent/store/index.ts');
    const { silentLogger } = await import('../../common/log.ts');
    const st = await openMailStore(dev, { log: silentLogger, compactBytesPerSec: 0 });
    for (let i = 0; i < 40; i++) await st.deliver(`bar-${i}`, ['bar'], Buffer.from(`Subject: ${i}\r\n\r\n${'z'.repeat(20_000)}\r\n`));
    const metas = await st.listMessages('bar', 'INBOX');
    await st.expunge('bar', 'INBOX', metas.slice(0, 30).map((m) => m.uid)); // something for compact to move
    await st.close();
    await dev.close();
    // `script` gives the command a pty, as an operator's terminal; stdout of script carries what the bar drew.
    const onTty = async (args: string) => (await run('script', ['-qec', `${process.execPath} ${cli} ${args}`, '/dev/null'], { timeout: 30_000 })).stdout;
    const checked = await onTty(`store check --volume ${vol}`);
    expect(checked).toMatch(/verifying bodies \[[^\]]*\] 100% 10\/10/);
    expect(checked).toMatch(/no problems found/);
    const compacted = await onTty(`store compact --volume ${vol}`);
    expect(compacted).toMatch(/segments free/);
    // Without a terminal no bar (no escape codes in a log file or a pipe).
    const piped = await run(process.execPath, [cli, 'store', 'check', '--volume', vol], { timeout: 20_000 });
    expect(piped.stdout + piped.stderr).not.toMatch(/verifying bodies/);

    const fail = (args: string[]) =>
      run(process.execPath, [cli, 'store', ...args], { timeout: 20_000 }).then(
        (r) => ({ code: 0, out: r.stdout + r.stderr }),
        (e: { code: number; stdout: string; stderr: string }) => ({ code: e.code, out: e.stdout + e.stderr }),
      );
    const missing = await fail(['check', '--volume', join(dir.path, 'nope.img')]);
    expect(missing.code).toBe(2);
    expect(missing.out).toMatch(/cannot open volume file .*nope\.img: ENOENT/);
    expect(missing.out).not.toMatch(/\bat async\b/);
    const junk = join(dir.path, 'junk.img');
    writeFileSync(junk, randomBytes(1024 * 1024));
    const notStore = await fail(['check', '--volume', junk]);
    expect(notStore.code).toBe(1);
    expect(notStore.out).toMatch(/INTEGRITY: no valid store superblock.*pairgate store format/);
    expect((await fail(['stats', '--volume', junk])).code).toBe(1);
    expect((await fail(['compact', '--volume', vol, '--rate', 'fast'])).out).toMatch(/BAD_INPUT: --rate must be a whole number/);
    const noYes = await fail(['format', '--volume', junk]);
    expect(noYes.code).toBe(2);
    expect(noYes.out).toMatch(/add --yes/);
    expect((await fail(['format', '--volume', junk, '--yes'])).out).toMatch(/formatted .*empty store/);
    const after = await fail(['check', '--volume', junk]);
    expect(after.code).toBe(0);
    expect(after.out).toMatch(/messages: 0[\s\S]*no problems found/);
  }, 60_000);
});
