/**
 * IMAP across a failover: two real pair-agents run the store on one shared disk (shared-disk
 * mode, fencing keeps one writer; the replicated volume gives the same "the other node recovers
 * the same blocks" situation). A real client (imapflow, CONDSTORE enabled) changes flags,
 * expunges, moves and appends on the primary; the primary is SIGKILLed; the client reconnects to
 * the floating address and must see the same UIDVALIDITY, UIDs, flags and per-message MODSEQ,
 * a HIGHESTMODSEQ that did not go backwards, nothing reported as changed since the last state it
 * saw (CHANGEDSINCE), and new changes and deliveries numbered above everything seen before.
 */
import { join } from 'node:path';
import { ImapFlow } from 'imapflow';
import nodemailer from 'nodemailer';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort, waitFor } from '../helpers/net.ts';
import { startPair, type TestPair } from './pair-agent-harness.ts';

const MASTER = { user: 'proxy-master', secret: 'master-secret-123' };
let pair: TestPair;
let ports: { lmtp: number; pop3: number; imap: number };

beforeAll(async () => {
  ports = { lmtp: await freePort(), pop3: await freePort(), imap: await freePort() };
  const node = (dir: string) => ({
    sharedDisk: { file: join(dir, 'shared.disk'), sizeBytes: 32 * 1024 * 1024 },
    store: {
      ports,
      masterUser: MASTER.user,
      masterSecret: MASTER.secret,
      users: { alice: 'alice-pw' },
      cacheBytes: 1024 * 1024,
      compactBytesPerSec: 0,
      checkpointBytes: 1024 * 1024,
    },
  });
  pair = await startPair({ a: node, b: node });
}, 60_000);

afterAll(async () => {
  await pair?.stop();
});

interface Snapshot {
  uidValidity: bigint;
  uidNext: number;
  highestModseq: bigint;
  messages: Map<number, { flags: string[]; modseq: bigint; subject: string }>;
}

function client(): ImapFlow {
  const c = new ImapFlow({
    host: pair.address,
    port: ports.imap,
    secure: false,
    auth: { user: 'alice', pass: 'alice-pw' },
    logger: false,
    connectionTimeout: 5000,
    greetingTimeout: 5000,
    socketTimeout: 20_000,
  });
  c.on('error', () => undefined);
  return c;
}

/** Everything a syncing client keeps about one mailbox (opened read-only, so reading changes nothing). */
async function snapshot(c: ImapFlow, path: string): Promise<Snapshot> {
  const box = await c.mailboxOpen(path, { readOnly: true });
  const messages = new Map<number, { flags: string[]; modseq: bigint; subject: string }>();
  if (box.exists > 0) {
    for await (const m of c.fetch('1:*', { uid: true, flags: true, envelope: true })) {
      // \Recent is per session by definition; everything else must survive.
      const flags = [...(m.flags ?? [])].filter((f) => f !== '\\Recent').sort();
      messages.set(m.uid, { flags, modseq: m.modseq ?? -1n, subject: m.envelope?.subject ?? '' });
    }
  }
  await c.mailboxClose();
  return { uidValidity: box.uidValidity, uidNext: box.uidNext, highestModseq: box.highestModseq ?? -1n, messages };
}

async function deliver(subject: string): Promise<void> {
  const lmtp = nodemailer.createTransport({ host: pair.address, port: ports.lmtp, lmtp: true, ignoreTLS: true, connectionTimeout: 5000 });
  try {
    const info = await lmtp.sendMail({ from: 'sender@example.net', to: 'alice@pair-t', subject, text: `body of ${subject}` });
    expect(info.accepted).toEqual(['alice@pair-t']);
  } finally {
    lmtp.close();
  }
}

describe('IMAP across a failover', () => {
  it('a reconnecting client sees the same UIDVALIDITY, UIDs, flags and MODSEQs; modification sequences never go backwards', async () => {
    expect(await pair.waitPrimary()).toBe('a');
    for (let i = 1; i <= 6; i++) await deliver(`before-${i}`);

    const c1 = client();
    await c1.connect();
    expect(c1.enabled.has('CONDSTORE')).toBe(true);
    await c1.mailboxOpen('INBOX');
    await c1.messageFlagsAdd({ uid: '1:2' }, ['\\Flagged'], { uid: true });
    await c1.messageFlagsAdd({ uid: '3' }, ['\\Seen', 'project-x'], { uid: true });
    await c1.messageFlagsAdd({ uid: '4' }, ['\\Deleted'], { uid: true });
    await c1.messageDelete({ uid: '4' }, { uid: true }); // UID EXPUNGE: a gap in the UIDs
    await c1.messageMove({ uid: '5' }, 'Archive', { uid: true });
    const appended = await c1.append('INBOX', 'Subject: appended-before\r\n\r\nhello\r\n', ['\\Seen', '\\Draft']);
    expect(appended).toMatchObject({ uid: 7 });
    const before = { inbox: await snapshot(c1, 'INBOX'), archive: await snapshot(c1, 'Archive') };
    expect([...before.inbox.messages.keys()]).toEqual([1, 2, 3, 6, 7]);
    expect(before.inbox.messages.get(3)!.flags).toEqual(['\\Seen', 'project-x']);
    expect(before.archive.messages.size).toBe(1);
    // Stay selected while the primary dies, as a real client would be.
    await c1.mailboxOpen('INBOX');
    const c1Closed = new Promise<void>((resolve) => c1.once('close', () => resolve()));

    pair.a.proc!.kill('SIGKILL');
    await waitFor(async () => (await pair.floatingHealth(200))?.body.primary === 'b', 20_000, 'b primary');
    // The old connection cannot survive its server process; the client notices and reconnects.
    let closeTimer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([c1Closed, new Promise((_, rej) => (closeTimer = setTimeout(() => rej(new Error('old connection still open')), 25_000)))]);
    } finally {
      clearTimeout(closeTimer); // not left running for 25 s after the close was seen
    }

    const c2 = client();
    await waitFor(async () => {
      try {
        await c2.connect();
        return true;
      } catch {
        return false;
      }
    }, 15_000, 'IMAP login on the new primary');
    try {
      expect(c2.enabled.has('CONDSTORE')).toBe(true);
      for (const [path, was] of [['INBOX', before.inbox], ['Archive', before.archive]] as const) {
        const now = await snapshot(c2, path);
        expect(now.uidValidity, `${path} UIDVALIDITY`).toBe(was.uidValidity);
        expect(now.uidNext, `${path} UIDNEXT`).toBeGreaterThanOrEqual(was.uidNext);
        expect(now.highestModseq >= was.highestModseq, `${path} HIGHESTMODSEQ ${now.highestModseq} < ${was.highestModseq}`).toBe(true);
        expect(now.messages, `${path} messages, flags and MODSEQs`).toEqual(was.messages);
      }

      // CHANGEDSINCE the last state the client saw: nothing (a replayed change would show here).
      await c2.mailboxOpen('INBOX');
      const changed: number[] = [];
      for await (const m of c2.fetch('1:*', { uid: true, flags: true }, { changedSince: before.inbox.highestModseq })) changed.push(m.uid);
      expect(changed).toEqual([]);

      // New changes and deliveries are numbered above everything seen before the failover.
      await c2.messageFlagsRemove({ uid: '1' }, ['\\Flagged'], { uid: true });
      await deliver('after-1');
      const after = await snapshot(c2, 'INBOX');
      expect(after.uidValidity).toBe(before.inbox.uidValidity);
      const uids = [...after.messages.keys()];
      expect(uids.slice(0, 5)).toEqual([1, 2, 3, 6, 7]);
      expect(uids[5]).toBeGreaterThanOrEqual(before.inbox.uidNext);
      expect(after.messages.get(uids[5]!)!.subject).toBe('after-1');
      expect(after.messages.get(1)!.modseq > before.inbox.highestModseq).toBe(true);
      expect(after.messages.get(uids[5]!)!.modseq > before.inbox.highestModseq).toBe(true);
      expect(after.highestModseq > before.inbox.highestModseq).toBe(true);
      for (const uid of [2, 3, 6, 7]) expect(after.messages.get(uid)).toEqual(before.inbox.messages.get(uid));
    } finally {
      await c2.logout().catch(() => c2.close());
    }
  }, 90_000);
});
