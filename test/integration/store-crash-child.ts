/**
 * Child process for the crash test (not a test file): opens the store on a volume file and
 * delivers a stream of messages, several at a time, printing `ACK <n>` once each delivery is
 * acknowledged, until it is killed. Message n goes to users u<n%7> and u<(n+3)%7>, with a body
 * that encodes n and a size that varies with it, some large enough to span several chunks.
 */
import { FileBlockDevice } from '../../pair-agent/volume/block-device.ts';
import { openMailStore } from '../../pair-agent/store/index.ts';
import { silentLogger } from '../../common/log.ts';

export function crashBody(n: number): Buffer {
  const pad = (n * 7919) % 5 === 0 ? 150_000 + (n % 1000) : 200 + ((n * 131) % 4000);
  return Buffer.from(`Subject: crash ${n}\r\nX-N: ${n}\r\n\r\n${String(n).repeat(1 + (pad / String(n).length) | 0).slice(0, pad)}\r\n`);
}

export function crashUsers(n: number): string[] {
  return [`u${n % 7}`, `u${(n + 3) % 7}`];
}

async function main(): Promise<void> {
  const [path, startArg] = process.argv.slice(2);
  const device = await FileBlockDevice.open(path!);
  const store = await openMailStore(device, { log: silentLogger, checkpointBytes: 2 * 1024 * 1024, compactBytesPerSec: 0 });
  let n = Number(startArg ?? '0');
  process.stdout.write('READY\n');
  const worker = async () => {
    for (;;) {
      const i = n++;
      const r = await store.deliver(`crash-${i}`, crashUsers(i), crashBody(i));
      if (r.every((x) => x.ok)) process.stdout.write(`ACK ${i}\n`);
      // Every so often expunge an old message, so refcounts and frees are exercised too.
      if (i % 17 === 0) {
        const list = await store.listMessages(`u${i % 7}`, 'INBOX');
        if (list.length > 5) {
          const n = /X-N: (\d+)/.exec((await store.readMessage(list[0]!.bodyId)).toString('latin1'))![1];
          // Announced before the expunge: a kill may land either side of it.
          process.stdout.write(`EXP u${i % 7} ${n}\n`);
          await store.expunge(`u${i % 7}`, 'INBOX', [list[0]!.uid]);
        }
      }
    }
  };
  await Promise.all([worker(), worker(), worker(), worker()]);
}

if (process.argv[1] && import.meta.url.endsWith(process.argv[1].split('/').pop()!)) {
  main().catch((err) => {
    process.stderr.write(String(err?.stack ?? err) + '\n');
    process.exit(1);
  });
}
