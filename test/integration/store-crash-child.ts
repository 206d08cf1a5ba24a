/**
 * Child process for the crash test (not a test file): opens the store on a volume file and
 * delivers a stream of messages, several at a time, printing `ACK <n>` once each delivery is
 * acknowledged, until it is killed. Message n goes to users u<n%7> and u<(n+3)%7>, with a body
 * that encodes n and a size that varies with it; every third delivery also expunges the oldest
 * message of a mailbox, so that the small volume needs background compaction.
 */
import { FileBlockDevice } from '../../pair-agent/volume/block-device.ts';
import { openMailStore } from '../../pair-agent/store/index.ts';
import { silentLogger } from '../../common/log.ts';
import { LimitError } from '../../common/errors.ts';

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
  // Background compaction on, often: the volume is small and old mail is expunged, so kills land mid-compaction too.
  const store = await openMailStore(device, { log: process.env.CRASH_CHILD_LOG ? (await import("../../common/log.ts")).createLogger({ role: "crash-child", destination: (await import("pino")).destination({ fd: 2, sync: true }) }) : silentLogger, checkpointBytes: 2 * 1024 * 1024, compactBytesPerSec: 64 * 1024 * 1024, compactIntervalMs: 100 });
  let n = Number(startArg ?? '0');
  const numbers = new Map<string, number>();
  process.stdout.write('READY\n');
  const worker = async () => {
    for (;;) {
      const i = n++;
      let r;
      for (let attempt = 0; ; attempt++) {
        try {
          r = await store.deliver(`crash-${i}`, crashUsers(i), crashBody(i));
          break;
        } catch (err) {
          // A full volume is a temporary refusal (LMTP 452): wait for compaction, as a proxy would retry.
          if (!(err instanceof LimitError) || attempt > 200) throw err;
          process.stdout.write('FULL\n');
          await new Promise((res) => setTimeout(res, 50));
        }
      }
      if (r.every((x) => x.ok)) process.stdout.write(`ACK ${i}\n`);
      // Keep mailboxes small: expunge old mail, but leave every eighth message ("keepers", up to 16 per
      // user) in place, so segments end up sparse and background compaction has to move live bodies.
      r.forEach((x) => x.ok && x.uid !== undefined && numbers.set(`${x.user}/${x.uid}`, i));
      if (i % 3 === 0) {
        const user = `u${i % 7}`;
        const list = await store.listMessages(user, 'INBOX');
        for (const m of list) {
          // Messages from before a restart: their number is in the body.
          if (!numbers.has(`${user}/${m.uid}`)) numbers.set(`${user}/${m.uid}`, Number(/X-N: (\d+)/.exec((await store.readMessage(m.bodyId)).toString('latin1'))![1]));
        }
        const num = (uid: number) => numbers.get(`${user}/${uid}`)!;
        const keepers = list.filter((m) => num(m.uid) % 8 === 0);
        const others = list.filter((m) => num(m.uid) % 8 !== 0);
        const old = [...others.slice(0, Math.max(0, others.length - 4)), ...keepers.slice(0, Math.max(0, keepers.length - 16))];
        if (old.length) {
          // Announced before the expunge: a kill may land either side of it.
          for (const m of old) process.stdout.write(`EXP ${user} ${num(m.uid)}\n`);
          await store.expunge(user, 'INBOX', old.map((m) => m.uid));
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
