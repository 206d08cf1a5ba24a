/**
 * Real IMAP clients against the store's IMAP server: imapflow (full sync, append, flags, IDLE),
 * Python's imaplib, mbsync (isync) syncing both ways to a local Maildir (a second run finds
 * nothing to do), and curl listing and fetching.
 */
import { execFile } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { ImapFlow } from 'imapflow';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { message, startHarness, type Harness } from './imap-harness.ts';

const run = promisify(execFile);
let h: Harness;

beforeAll(async () => {
  h = await startHarness();
});
afterAll(async () => {
  await h?.close();
});

function hasTool(cmd: string): boolean {
  return ['/usr/bin', '/usr/local/bin', '/bin'].some((d) => existsSync(join(d, cmd)));
}

async function commandCount(names: string[]): Promise<number> {
  const metric = await h.registry.getSingleMetric('pairgate_imap_commands_total')!.get();
  return metric.values.filter((v) => names.includes(String(v.labels.command))).reduce((n, v) => n + v.value, 0);
}

describe('imapflow', () => {
  it('syncs everything, appends, changes flags and is woken in IDLE by a delivery', async () => {
    for (let i = 1; i <= 4; i++) await h.deliver(['alice'], message(`flow-${i}`, `Body ${i}\r\n`));
    const client = new ImapFlow({ host: '127.0.0.1', port: h.port, secure: false, auth: { user: 'alice', pass: 'alice-pw' }, logger: false });
    await client.connect();
    try {
      // Full sync: every mailbox, every message's envelope, flags and source.
      const boxes = await client.list();
      expect(boxes.map((b) => b.path).sort()).toEqual(['Archive', 'Drafts', 'INBOX', 'Junk', 'Sent', 'Trash']);
      expect(boxes.find((b) => b.path === 'Sent')?.specialUse).toBe('\\Sent');
      let total = 0;
      for (const box of boxes) {
        const lock = await client.getMailboxLock(box.path);
        try {
          for await (const msg of client.fetch('1:*', { uid: true, flags: true, envelope: true, source: true, bodyStructure: true })) {
            total++;
            expect(msg.source?.toString()).toContain(`Subject: ${msg.envelope?.subject}`);
            expect(msg.bodyStructure?.type).toBe('text/plain');
          }
        } finally {
          lock.release();
        }
      }
      expect(total).toBe(4);

      const lock = await client.getMailboxLock('INBOX');
      try {
        const appended = await client.append('INBOX', message('flow-appended'), ['\\Seen', 'custom-kw']);
        expect(appended).toMatchObject({ uid: 5 });
        expect(await client.messageFlagsAdd({ uid: '1:2' }, ['\\Flagged'], { uid: true })).toBe(true);
        await client.messageFlagsRemove('5', ['custom-kw']);
        const flagged = await client.search({ flagged: true }, { uid: true });
        expect(flagged).toEqual([1, 2]);
        const meta = await client.fetchOne('5', { flags: true });
        // \Recent too: this session is the first to see the appended message.
        expect([...(meta as { flags: Set<string> }).flags].sort()).toEqual(['\\Recent', '\\Seen']);
        const status = await client.status('INBOX', { messages: true, unseen: true, uidNext: true });
        expect(status).toMatchObject({ messages: 5, unseen: 4, uidNext: 6 });

        // IDLE: a delivery through the store wakes the client with EXISTS.
        const exists = new Promise<number>((resolve) => client.once('exists', (d: { count: number }) => resolve(d.count)));
        const idling = client.idle();
        await new Promise((r) => setTimeout(r, 100));
        await h.deliver(['alice'], message('flow-idle'));
        const count = await Promise.race([exists, new Promise<number>((_, rej) => setTimeout(() => rej(new Error('no EXISTS in IDLE')), 5000))]);
        expect(count).toBe(6);
        const got = await client.fetchOne('6', { envelope: true });
        expect((got as { envelope: { subject: string } }).envelope.subject).toBe('flow-idle');
        void idling;
      } finally {
        lock.release();
      }
    } finally {
      await client.logout();
    }
  });
});

describe('python imaplib', () => {
  it('logs in, selects, fetches, searches, stores, appends and copies', async () => {
    await h.deliver(['carol'], message('py-1', 'first python message\r\n'));
    const script = `
import imaplib, json, sys, time
m = imaplib.IMAP4('127.0.0.1', int(sys.argv[1]))
out = {}
out['login'] = m.login('carol', 'carol-pw')[0]
typ, data = m.select('INBOX')
out['exists'] = int(data[0])
typ, data = m.fetch('1', '(UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (SUBJECT)] BODY[TEXT])')
out['fetch_header'] = data[0][1].decode()
out['fetch_text'] = data[1][1].decode() if isinstance(data[1], tuple) else None
out['flags_after_body'] = m.fetch('1', '(FLAGS)')[1][0].decode()
out['search'] = m.search(None, 'SUBJECT', '"py-1"')[1][0].decode()
out['store'] = m.store('1', '+FLAGS', '(\\\\Flagged)')[1][0].decode()
t, d = m.append('INBOX', '(\\\\Seen)', imaplib.Time2Internaldate(time.time()), b'Subject: py-appended\\r\\n\\r\\nhello\\r\\n')
out['append'] = d[0].decode()
out['uid_search'] = m.uid('SEARCH', None, 'SUBJECT', 'py-appended')[1][0].decode()
out['copy'] = m.copy('1:2', 'Archive')[1][0].decode()
out['status'] = m.status('Archive', '(MESSAGES)')[1][0].decode()
out['list'] = [x.decode() for x in m.list('""', '*')[1]]
m.close()
out['logout'] = m.logout()[0]
print(json.dumps(out))
`;
    const { stdout } = await run('python3', ['-c', script, String(h.port)], { timeout: 20_000 });
    const out = JSON.parse(stdout) as Record<string, unknown>;
    expect(out.login).toBe('OK');
    expect(out.exists).toBe(1);
    expect(out.fetch_header).toBe('Subject: py-1\r\n\r\n');
    expect(out.fetch_text).toBe('first python message\r\n');
    expect(out.flags_after_body).toContain('\\Seen');
    expect(out.search).toBe('1');
    expect(out.store).toContain('\\Flagged');
    expect(out.append).toMatch(/^\[APPENDUID \d+ 2\]/);
    expect(out.uid_search).toBe('2');
    expect(out.copy).toMatch(/^\[COPYUID \d+ 1:2 1:2\]/);
    expect(out.status).toContain('MESSAGES 2');
    expect((out.list as string[]).length).toBe(6);
    expect(out.logout).toBe('BYE');
  });
});

describe.skipIf(!hasTool('curl'))('curl', () => {
  it('lists mailboxes and fetches a message by UID', async () => {
    const body = message('curl-msg', 'fetched by curl\r\n');
    await h.deliver(['bob'], body);
    const base = `imap://bob:bob-pw@127.0.0.1:${h.port}`;
    const list = await run('curl', ['-sS', '--max-time', '10', `${base}/`]);
    expect(list.stdout).toMatch(/^\* LIST \([^)]*\) "\/" "?INBOX"?\r?$/m);
    expect(list.stdout).toContain('\\Sent');
    const fetched = await run('curl', ['-sS', '--max-time', '10', `${base}/INBOX;UID=1`]);
    expect(fetched.stdout).toBe(body);
    const search = await run('curl', ['-sS', '--max-time', '10', `${base}/INBOX?SUBJECT%20curl-msg`]);
    expect(search.stdout).toMatch(/^\* SEARCH 1\r?$/m);
  });
});

describe.skipIf(!hasTool('mbsync'))('mbsync', () => {
  it('syncs both ways to a local Maildir; a second run finds nothing to do', async () => {
    const user = 'dave';
    await h.store.ensureUser(user);
    for (let i = 1; i <= 3; i++) await h.deliver([user], message(`mb-${i}`, `mbsync body ${i}\r\n`));
    const local = join(h.dir, 'maildir');
    mkdirSync(local);
    const rc = join(h.dir, 'mbsyncrc');
    writeFileSync(
      rc,
      `IMAPAccount test
Host 127.0.0.1
Port ${h.port}
User ${user}
Pass dave-pw
SSLType None
AuthMechs LOGIN

IMAPStore remote
Account test

MaildirStore local
Path ${local}/
Inbox ${local}/INBOX
SubFolders Verbatim

Channel sync
Far :remote:
Near :local:
Patterns *
Create Both
Expunge Both
SyncState *
`,
    );
    const mbsync = () => run('mbsync', ['-c', rc, '-a'], { timeout: 30_000 });
    const files = (box: string) => ['new', 'cur'].flatMap((d) => (existsSync(join(local, box, d)) ? readdirSync(join(local, box, d)).map((f) => join(local, box, d, f)) : [])).sort();

    // Run 1: far to near.
    await mbsync();
    expect(files('INBOX')).toHaveLength(3);
    expect(readdirSync(local).sort()).toEqual(['Archive', 'Drafts', 'INBOX', 'Junk', 'Sent', 'Trash']);

    // Changes on both sides: a new local message and a local flag; a remote delivery and a remote \Seen.
    const localMsg = message('mb-local', 'written in the maildir\r\n');
    writeFileSync(join(local, 'INBOX', 'new', `${Date.now()}.1.local`), localMsg);
    const first = files('INBOX').find((f) => readFileSync(f, 'utf8').includes('Subject: mb-1'))!;
    renameSync(first, first.replace(/\/new\//, '/cur/').replace(/(:2,[A-Z]*)?$/, ':2,F'));
    await h.deliver([user], message('mb-4'));
    const remote = await h.store.listMessages(user, 'INBOX');
    await h.store.updateFlags(user, 'INBOX', [remote[1]!.uid], 'add', ['\\Seen']);

    // Run 2: both ways.
    await mbsync();
    const after = await h.store.listMessages(user, 'INBOX');
    expect(after).toHaveLength(5);
    const bodies = await Promise.all(after.map((m) => h.store.readMessage(m.bodyId)));
    // mbsync adds its X-TUID header to what it uploads; the rest arrives as written.
    expect(bodies.some((b) => b.toString().includes('Subject: mb-local') && b.toString().endsWith('written in the maildir\r\n'))).toBe(true);
    expect(after[0]!.flags).toContain('\\Flagged');
    expect(files('INBOX')).toHaveLength(5);
    const seenLocal = files('INBOX').find((f) => readFileSync(f, 'utf8').includes('Subject: mb-2'))!;
    expect(seenLocal).toMatch(/:2,[A-Z]*S/);

    // Run 3: nothing to do: no uploads, no flag changes, no downloads, no local file touched.
    const before = files('INBOX');
    const changesBefore = await commandCount(['APPEND', 'STORE', 'UID STORE', 'EXPUNGE', 'UID EXPUNGE']);
    const fetchBefore = await commandCount(['UID FETCH']);
    await mbsync();
    expect(await commandCount(['APPEND', 'STORE', 'UID STORE', 'EXPUNGE', 'UID EXPUNGE'])).toBe(changesBefore);
    expect(files('INBOX')).toEqual(before);
    expect((await h.store.listMessages(user, 'INBOX')).map((m) => [m.uid, m.flags.slice().sort()])).toEqual(after.map((m) => [m.uid, m.flags.slice().sort()]));
    console.log(`mbsync third run: ${(await commandCount(['UID FETCH'])) - fetchBefore} UID FETCH (flags/new check), no changes`);
  });
});
