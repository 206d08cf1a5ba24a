/**
 * Two sessions on one mailbox: changes made by one reach the other as untagged responses at
 * the moments RFC 3501 allows (no EXPUNGE during FETCH, STORE or SEARCH; sequence numbers the
 * client knows stay right), and IDLE is woken by a delivery, a flag change and an expunge.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loggedIn, message, startHarness, type Harness, type RawClient } from './imap-harness.ts';

let h: Harness;
beforeAll(async () => {
  h = await startHarness();
});
afterAll(async () => {
  await h?.close();
});

describe('two sessions on one mailbox', () => {
  let a: RawClient;
  let b: RawClient;
  beforeAll(async () => {
    for (let i = 1; i <= 5; i++) await h.deliver(['alice'], message(`m${i}`));
    a = await loggedIn(h.port, 'alice');
    b = await loggedIn(h.port, 'alice');
    await a.send('SELECT INBOX');
    await b.send('SELECT INBOX');
  });
  afterAll(() => {
    a?.close();
    b?.close();
  });

  it('holds EXPUNGE back during FETCH, STORE and SEARCH, and reports it at NOOP with right numbers', async () => {
    await b.send('STORE 2,4 +FLAGS.SILENT (\\Deleted)');
    const exp = await b.send('EXPUNGE');
    expect(exp.text).toMatch(/^\* 4 EXPUNGE\r\n\* 2 EXPUNGE\r$/m);

    // A still sees 5 messages; during FETCH/STORE/SEARCH no EXPUNGE may arrive.
    const f = await a.send('FETCH 1:5 (UID FLAGS)');
    expect(f.text).not.toContain('EXPUNGE');
    expect(f.text).toMatch(/^\* 1 FETCH \(UID 1 /m);
    expect(f.text).toMatch(/^\* 3 FETCH \(UID 3 /m);
    expect(f.text).toMatch(/^\* 5 FETCH \(UID 5 /m);
    const st = await a.send('STORE 5 +FLAGS (\\Flagged)');
    expect(st.text).not.toContain('EXPUNGE');
    expect(st.text).toMatch(/^\* 5 FETCH \(FLAGS \(/m);
    const se = await a.send('SEARCH ALL');
    expect(se.text).not.toContain('EXPUNGE');
    expect(se.text).toMatch(/^\* SEARCH 1 3 5\r$/m);

    // NOOP delivers the expunges, highest first so each number is right when it is read.
    const n = await a.send('NOOP');
    expect(n.text).toMatch(/^\* 4 EXPUNGE\r\n\* 2 EXPUNGE\r$/m);
    const after = await a.send('FETCH 1:* UID');
    expect(after.text).toMatch(/^\* 1 FETCH \(UID 1\)\r\n\* 2 FETCH \(UID 3\)\r\n\* 3 FETCH \(UID 5\)\r$/m);
    // And B learns about A's flag change, as an untagged FETCH.
    const bn = await b.send('NOOP');
    expect(bn.text).toMatch(/^\* 3 FETCH \(UID 5 FLAGS \([^)]*\\Flagged[^)]*\)\)/m);
  });

  it('UID commands may see EXPUNGE right away', async () => {
    await b.send('STORE 1 +FLAGS.SILENT (\\Deleted)');
    await b.send('EXPUNGE');
    const f = await a.send('UID FETCH 1:* FLAGS');
    expect(f.text).toMatch(/^\* 1 EXPUNGE\r$/m);
    // FETCH answers use the numbers in force before the EXPUNGE response; after it UID 3 is number 1.
    expect(f.text).toMatch(/^\* 2 FETCH \(UID 3 /m);
    expect((await a.send('FETCH 1 UID')).text).toMatch(/^\* 1 FETCH \(UID 3\)/m);
    await b.send('NOOP');
  });

  it('reports new messages as EXISTS and RECENT to one session only', async () => {
    await h.deliver(['alice'], message('new-1'));
    const an = await a.send('NOOP');
    // A selected first and holds \Recent for its messages (UIDs 3, 5 and the new one); B holds none.
    expect(an.text).toMatch(/^\* 3 EXISTS\r\n\* 3 RECENT\r$/m);
    const bn = await b.send('NOOP');
    expect(bn.text).toMatch(/^\* 3 EXISTS\r\n\* 0 RECENT\r$/m);
  });

  it('IDLE wakes on a delivery, on another session\'s flag change and on an expunge', async () => {
    const tag = a.nextTag();
    a.writeRaw(`${tag} IDLE\r\n`);
    expect(await a.readLine()).toBe('+ idling');
    const t0 = Date.now();
    await h.deliver(['alice'], message('while-idle'));
    await a.waitFor((t) => /\* 4 EXISTS\r\n/.test(t), 5000);
    console.log(`IDLE saw the delivery after ${Date.now() - t0} ms`);
    await b.send('STORE 1 +FLAGS (\\Seen)');
    await a.waitFor((t) => /\* 1 FETCH \(UID 3 FLAGS \([^)]*\\Seen/.test(t), 5000);
    await b.send('STORE 2 +FLAGS.SILENT (\\Deleted)');
    await b.send('EXPUNGE');
    await a.waitFor((t) => /\* 2 EXPUNGE\r\n/.test(t), 5000);
    a.writeRaw('DONE\r\n');
    const done = await a.until(tag);
    expect(done.status).toBe('OK');
    expect(done.text).toMatch(/\* 4 EXISTS[\s\S]*\* 2 EXPUNGE/);
  });

  it('a mailbox deleted under a session ends that session with BYE', async () => {
    const c = await loggedIn(h.port, 'alice');
    await c.send('CREATE Doomed');
    const d = await loggedIn(h.port, 'alice');
    await d.send('SELECT Doomed');
    await c.send('DELETE Doomed');
    await d.writeRaw('X NOOP\r\n');
    expect(await d.waitFor((t) => t.includes('* BYE'), 5000)).toContain('* BYE');
    c.close();
    d.close();
  });
});

describe('SELECT from a shared message-list snapshot', () => {
  it('reuses the list of an unchanged mailbox and never shows a stale one after a change', async () => {
    const user = 'carol';
    await h.store.ensureUser(user);
    for (let i = 1; i <= 4; i++) await h.deliver([user], message(`snap-${i}`));
    // Count the store reads behind SELECT (the real store, only observed).
    const store = h.store as unknown as { listMessages: (u: string, m: string) => Promise<unknown[]> };
    const original = store.listMessages.bind(h.store);
    let reads = 0;
    store.listMessages = async (u, m) => {
      if (u === user && m === 'INBOX') reads++;
      return original(u, m);
    };
    const a = await loggedIn(h.port, user);
    const b = await loggedIn(h.port, user);
    try {
      const exists = async (c: RawClient) => Number(/^\* (\d+) EXISTS\r$/m.exec((await c.send('SELECT INBOX')).text)![1]);
      expect(await exists(a)).toBe(4);
      const afterFirst = reads;
      expect(await exists(b)).toBe(4);
      expect(reads).toBe(afterFirst);

      // A flag change by one session is in the next SELECT of the other.
      await a.send('STORE 2 +FLAGS (\\Flagged)');
      await b.send('UNSELECT');
      expect(await exists(b)).toBe(4);
      expect((await b.send('FETCH 2 FLAGS')).text).toMatch(/^\* 2 FETCH \(FLAGS \([^)]*\\Flagged/m);
      // So is an expunge, and a delivery.
      await a.send('STORE 1 +FLAGS.SILENT (\\Deleted)');
      await a.send('EXPUNGE');
      await h.deliver([user], message('snap-5'));
      await b.send('UNSELECT');
      expect(await exists(b)).toBe(4);
      expect((await b.send('FETCH 1:* (UID)')).text).toMatch(/^\* 1 FETCH \(UID 2\)\r\n\* 2 FETCH \(UID 3\)\r\n\* 3 FETCH \(UID 4\)\r\n\* 4 FETCH \(UID 5\)\r$/m);
      // A mailbox renamed away and created anew under the same name is empty, whatever was cached.
      await a.send('CREATE Box');
      await a.send('COPY 1:2 Box');
      await a.send('SELECT Box');
      await b.send('SELECT Box');
      await a.send('UNSELECT');
      await b.send('UNSELECT');
      expect((await a.send('RENAME Box Box2')).status).toBe('OK');
      expect((await a.send('CREATE Box')).status).toBe('OK');
      expect(await exists(b)).toBe(4);
      const sel = await b.send('SELECT Box');
      expect(sel.text).toMatch(/^\* 0 EXISTS\r$/m);
      expect((await b.send('SELECT Box2')).text).toMatch(/^\* 2 EXISTS\r$/m);
    } finally {
      store.listMessages = original;
      a.close();
      b.close();
    }
  });
});

