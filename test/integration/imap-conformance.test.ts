/**
 * IMAP conformance over real sockets, command by command, following RFC 3501's examples where
 * they apply (and RFC 2177, 2971, 4315, 6851, 7162, 9208 for the extensions), against the real
 * store on a local block device.
 */
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeTestCert } from '../helpers/tls.ts';
import { AddressList } from '../../common/cidr.ts';
import { loggedIn, message, RawClient, MASTER, startHarness, type Harness } from './imap-harness.ts';

const plain = (authz: string, authc: string, pw: string) => Buffer.from(`${authz}\0${authc}\0${pw}`).toString('base64');

let h: Harness;
beforeAll(async () => {
  h = await startHarness();
});
afterAll(async () => {
  await h?.close();
});

describe('not authenticated', () => {
  it('greets with capabilities, answers CAPABILITY and NOOP, says BYE on LOGOUT', async () => {
    const c = await RawClient.connect(h.port);
    const cap = await c.send('CAPABILITY');
    expect(cap.text).toMatch(/^\* CAPABILITY IMAP4rev1 .*AUTH=PLAIN/m);
    for (const x of ['LITERAL+', 'IDLE', 'NAMESPACE', 'ID', 'UIDPLUS', 'MOVE', 'SPECIAL-USE', 'ENABLE', 'CONDSTORE', 'QUOTA']) expect(cap.text).toContain(` ${x}`);
    expect((await c.send('NOOP')).status).toBe('OK');
    const out = await c.send('LOGOUT');
    expect(out.text).toMatch(/^\* BYE /m);
    expect(out.status).toBe('OK');
    await c.waitFor(() => c.closed);
  });

  it('LOGIN: right and wrong passwords', async () => {
    const c = await RawClient.connect(h.port);
    const bad = await c.send('LOGIN alice wrong');
    expect(bad.tagged).toMatch(/NO \[AUTHENTICATIONFAILED\]/);
    const ok = await c.send('LOGIN "alice" {8}\r\nalice-pw'.replace('{8}\r\n', '{8+}\r\n'));
    expect(ok.tagged).toMatch(/OK \[CAPABILITY IMAP4rev1 /);
    expect(ok.tagged).not.toContain('AUTH=PLAIN');
    c.close();
  });

  it('AUTHENTICATE PLAIN as the master user on behalf of a user (SASL-IR and continuation)', async () => {
    const c = await RawClient.connect(h.port);
    const r = await c.send(`AUTHENTICATE PLAIN ${plain('carol', MASTER.user, MASTER.secret)}`);
    expect(r.status).toBe('OK');
    expect((await c.send('SELECT INBOX')).status).toBe('OK');
    c.close();

    const d = await RawClient.connect(h.port);
    const tag = d.nextTag();
    d.writeRaw(`${tag} AUTHENTICATE PLAIN\r\n`);
    expect(await d.readLine()).toBe('+ ');
    d.writeRaw(`${plain('bob', MASTER.user, 'wrong-secret')}\r\n`);
    expect((await d.until(tag)).tagged).toMatch(/NO \[AUTHENTICATIONFAILED\]/);
    const t2 = d.nextTag();
    d.writeRaw(`${t2} AUTHENTICATE PLAIN\r\n`);
    await d.readLine();
    d.writeRaw('*\r\n');
    expect((await d.until(t2)).status).toBe('BAD');
    const t3 = d.nextTag();
    d.writeRaw(`${t3} AUTHENTICATE PLAIN\r\n`);
    await d.readLine();
    d.writeRaw(`${plain('bob', MASTER.user, MASTER.secret)}\r\n`);
    expect((await d.until(t3)).status).toBe('OK');
    d.close();
  });

  it('refuses the master login from an untrusted address', async () => {
    const h2 = await startHarness({ trusted: new AddressList(['192.0.2.0/24']) });
    try {
      const c = await RawClient.connect(h2.port);
      const r = await c.send(`AUTHENTICATE PLAIN ${plain('alice', MASTER.user, MASTER.secret)}`);
      expect(r.tagged).toMatch(/NO \[AUTHENTICATIONFAILED\]/);
      expect(h2.logs.join('\n')).toContain('master login from an untrusted address');
      // ID from an untrusted peer is answered but its address is not taken.
      await c.send('ID ("x-originating-ip" "198.51.100.9")');
      expect(h2.logs.join('\n')).toContain('ignored x-originating-ip');
      c.close();
    } finally {
      await h2.close();
    }
  });

  it('ID from a trusted proxy puts the client address on the session log', async () => {
    const c = await RawClient.connect(h.port);
    const r = await c.send('ID ("name" "pairgate-proxy" "x-originating-ip" "203.0.113.5" "x-originating-port" "51515" "x-session-id" "abc")');
    expect(r.text).toMatch(/^\* ID \("name" "pairgate"/m);
    await c.send(`AUTHENTICATE PLAIN ${plain('alice', MASTER.user, MASTER.secret)}`);
    const loginLine = h.logs.map((l) => JSON.parse(l) as Record<string, unknown>).find((l) => l.msg === 'logged in' && l.clientIp === '203.0.113.5');
    expect(loginLine).toMatchObject({ clientIp: '203.0.113.5', clientPort: '51515', user: 'alice', master: true });
    expect(h.logs.join('\n')).not.toContain(MASTER.secret);
    // The one closing line of the session carries the forwarded address and the user too.
    await c.send('LOGOUT');
    await c.waitFor(() => c.closed);
    const deadline = Date.now() + 3000;
    const closing = () => h.logs.map((l) => JSON.parse(l) as Record<string, unknown>).find((l) => l.msg === 'session closed' && l.clientIp === '203.0.113.5');
    while (!closing() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    expect(closing()).toMatchObject({ clientIp: '203.0.113.5', user: 'alice', commands: 3 });
    c.close();
  });

  it('answers commands in the wrong state and unknown commands with BAD, and goes on', async () => {
    const c = await RawClient.connect(h.port);
    expect((await c.send('SELECT INBOX')).tagged).toMatch(/BAD .*not allowed in the not-authenticated state/);
    expect((await c.send('FROBNICATE')).tagged).toMatch(/BAD Unknown command/);
    expect((await c.send('LOGIN alice')).tagged).toMatch(/BAD .*missing arguments/);
    expect((await c.send('NOOP')).status).toBe('OK');
    c.close();
  });
});

describe('STARTTLS', () => {
  it('upgrades the connection, drops pipelined plaintext, then logs in over TLS', async () => {
    const cert = makeTestCert(h.dir, 'imap');
    const h2 = await startHarness({ tls: { key: cert.key, cert: cert.cert } });
    try {
      const c = await RawClient.connect(h2.port);
      expect((await c.send('CAPABILITY')).text).toContain('STARTTLS');
      const tag = c.nextTag();
      // A command injected after STARTTLS in the same plaintext packet must not run.
      c.writeRaw(`${tag} STARTTLS\r\nX1 LOGIN alice alice-pw\r\n`);
      expect((await c.until(tag)).status).toBe('OK');
      await c.startTls();
      const cap = await c.send('CAPABILITY');
      expect(cap.text).not.toContain('STARTTLS');
      expect(cap.text).not.toContain('X1 ');
      expect((await c.send('LOGIN alice alice-pw')).status).toBe('OK');
      c.close();
    } finally {
      await h2.close();
    }
  });
});

describe('mailboxes', () => {
  it('creates the special-use mailboxes for a new user and lists them', async () => {
    const c = await loggedIn(h.port, 'bob');
    const r = await c.send('LIST "" "*"');
    for (const [name, use] of [['Sent', '\\Sent'], ['Drafts', '\\Drafts'], ['Trash', '\\Trash'], ['Junk', '\\Junk'], ['Archive', '\\Archive']]) {
      expect(r.text).toMatch(new RegExp(`^\\* LIST \\([^)]*\\${use}[^)]*\\) "/" "?${name}"?\\r$`, 'm'));
    }
    expect(r.text).toMatch(/^\* LIST \([^)]*\) "\/" "?INBOX"?\r$/m);
    expect((await c.send('LIST "" ""')).text).toContain('* LIST (\\Noselect) "/" ""');
    expect((await c.send('NAMESPACE')).text).toContain('* NAMESPACE (("" "/")) NIL NIL');
    c.close();
  });

  it('CREATE, hierarchy in LIST with % and *, RENAME with children, SUBSCRIBE/LSUB, DELETE', async () => {
    const c = await loggedIn(h.port, 'bob');
    expect((await c.send('CREATE Projects/2026/Q4')).status).toBe('OK');
    expect((await c.send('CREATE Projects')).tagged).toMatch(/NO \[ALREADYEXISTS\]/);
    expect((await c.send('CREATE inbox')).tagged).toMatch(/NO \[ALREADYEXISTS\]/);
    const pct = await c.send('LIST "" %');
    expect(pct.text).toMatch(/^\* LIST \(\\HasChildren\) "\/" "?Projects"?\r$/m);
    expect(pct.text).not.toContain('Projects/2026');
    const star = await c.send('LIST Projects/ *');
    expect(star.text).toContain('"Projects/2026/Q4"');
    expect((await c.send('RENAME Projects Work')).status).toBe('OK');
    const after = await c.send('LIST "" "Work*"');
    expect(after.text).toContain('"Work/2026/Q4"');
    expect(after.text).not.toContain('Projects');
    expect((await c.send('SUBSCRIBE Work/2026')).status).toBe('OK');
    const lsub = await c.send('LSUB "" "Work*"');
    expect(lsub.text).toContain('* LSUB');
    expect(lsub.text).toContain('"Work/2026"');
    expect(lsub.text).not.toContain('"Work/2026/Q4"');
    expect((await c.send('UNSUBSCRIBE Work/2026')).status).toBe('OK');
    expect((await c.send('LSUB "" "Work*"')).text).not.toContain('"Work/2026"');
    expect((await c.send('DELETE Work/2026/Q4')).status).toBe('OK');
    expect((await c.send('DELETE INBOX')).status).toBe('NO');
    expect((await c.send('DELETE Nope')).tagged).toMatch(/NO \[NONEXISTENT\]/);
    expect((await c.send('SELECT Nope')).tagged).toMatch(/NO \[NONEXISTENT\]/);
    c.close();
  });
});

describe('selected state', () => {
  let c: RawClient;
  const mixed = [
    'From: =?utf-8?q?J=C3=BCrgen?= <j@example.org>',
    'To: alice@example.net, Team: x@example.org, y@example.org;',
    'Subject: Report =?iso-8859-1?q?f=FCr?= you',
    'Date: Tue, 10 Nov 2026 09:00:00 +0100',
    'Message-ID: <mixed-1@example.org>',
    'MIME-Version: 1.0',
    'Content-Type: multipart/mixed; boundary="b1"',
    '',
    'preamble',
    '--b1',
    'Content-Type: multipart/alternative; boundary="b2"',
    '',
    '--b2',
    'Content-Type: text/plain; charset=utf-8',
    'Content-Transfer-Encoding: quoted-printable',
    '',
    'Gr=C3=BC=C3=9Fe aus Z=C3=BCrich, findme-qp',
    '--b2',
    'Content-Type: text/html; charset=utf-8',
    '',
    '<p>hello</p>',
    '--b2--',
    '--b1',
    'Content-Type: application/octet-stream; name="data.bin"',
    'Content-Disposition: attachment; filename="data.bin"',
    'Content-Transfer-Encoding: base64',
    '',
    Buffer.from('binary findme-b64 payload').toString('base64'),
    '--b1',
    'Content-Type: message/rfc822',
    '',
    'Subject: inner message',
    'From: inner@example.org',
    '',
    'inner body',
    '--b1--',
    '',
  ].join('\r\n');

  beforeAll(async () => {
    await h.deliver(['alice'], message('first'));
    await h.deliver(['alice'], Buffer.from(mixed, 'latin1'));
    await h.deliver(['alice'], message('third', 'Body with 8-bit: caf\xe9 and NUL \x00 bytes.\r\n'.replace('\xe9', 'é')));
    c = await loggedIn(h.port, 'alice');
  });
  afterAll(() => c?.close());

  it('SELECT reports FLAGS, EXISTS, RECENT, UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ; EXAMINE is read-only', async () => {
    const ex = await c.send('EXAMINE INBOX');
    expect(ex.tagged).toMatch(/OK \[READ-ONLY\]/);
    expect(ex.text).toMatch(/^\* OK \[PERMANENTFLAGS \(\)\]/m);
    const r = await c.send('SELECT INBOX');
    expect(r.tagged).toMatch(/OK \[READ-WRITE\]/);
    expect(r.text).toMatch(/^\* FLAGS \(\\Answered \\Flagged \\Deleted \\Seen \\Draft\)\r$/m);
    expect(r.text).toMatch(/^\* 3 EXISTS\r$/m);
    expect(r.text).toMatch(/^\* 3 RECENT\r$/m);
    expect(r.text).toMatch(/^\* OK \[UIDVALIDITY \d+\]/m);
    expect(r.text).toMatch(/^\* OK \[UIDNEXT 4\]/m);
    expect(r.text).toMatch(/^\* OK \[UNSEEN 1\]/m);
    expect(r.text).toMatch(/^\* OK \[HIGHESTMODSEQ \d+\]/m);
  });

  it('FETCH FLAGS/UID/INTERNALDATE/RFC822.SIZE/ENVELOPE/BODYSTRUCTURE', async () => {
    const r = await c.send('FETCH 2 (UID FLAGS INTERNALDATE RFC822.SIZE ENVELOPE BODYSTRUCTURE)');
    expect(r.text).toContain(`RFC822.SIZE ${Buffer.byteLength(mixed, 'latin1')}`);
    expect(r.text).toMatch(/INTERNALDATE "\d{2}-[A-Z][a-z]{2}-\d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}"/);
    expect(r.text).toContain('ENVELOPE ("Tue, 10 Nov 2026 09:00:00 +0100" "Report =?iso-8859-1?q?f=FCr?= you" (("=?utf-8?q?J=C3=BCrgen?=" NIL "j" "example.org"))');
    expect(r.text).toContain('((NIL NIL "alice" "example.net") (NIL NIL "Team" NIL) (NIL NIL "x" "example.org") (NIL NIL "y" "example.org") (NIL NIL NIL NIL))');
    expect(r.text).toContain('"<mixed-1@example.org>")');
    expect(r.text).toContain(
      'BODYSTRUCTURE (((("text" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 42 1 NIL NIL NIL NIL)("text" "html" ("charset" "utf-8") NIL NIL "7bit" 12 1 NIL NIL NIL NIL) "alternative" ("boundary" "b2") NIL NIL NIL)'.slice(15),
    );
    expect(r.text).toContain('("application" "octet-stream" ("name" "data.bin") NIL NIL "base64" 36 NIL ("attachment" ("filename" "data.bin")) NIL NIL)');
    expect(r.text).toContain('("message" "rfc822" NIL NIL NIL "7bit" 61 (NIL "inner message" ((NIL NIL "inner" "example.org")) ((NIL NIL "inner" "example.org")) ((NIL NIL "inner" "example.org")) NIL NIL NIL NIL NIL) ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 10 1 NIL NIL NIL NIL) 4 NIL NIL NIL NIL)');
    expect(r.text).toContain('"mixed" ("boundary" "b1") NIL NIL NIL))');
    // Flags untouched by these items.
    expect(r.text).toMatch(/FLAGS \(\\Recent\)/);
  });

  it('BODY[section] and partials return exact bytes; BODY.PEEK leaves \\Seen alone, BODY[] sets it', async () => {
    const peek = await c.send('FETCH 2 (BODY.PEEK[1.1] BODY.PEEK[1.1.MIME] BODY.PEEK[3.HEADER] BODY.PEEK[3.TEXT] BODY.PEEK[HEADER.FIELDS (Subject MESSAGE-ID)] BODY.PEEK[TEXT]<0.8>)');
    const lit = (label: string, body: string) => `${label} {${Buffer.byteLength(body)}}\r\n${body}`;
    expect(peek.text).toContain(lit('BODY[1.1]', 'Gr=C3=BC=C3=9Fe aus Z=C3=BCrich, findme-qp'));
    expect(peek.text).toContain(lit('BODY[1.1.MIME]', 'Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'));
    expect(peek.text).toContain(lit('BODY[3.HEADER]', 'Subject: inner message\r\nFrom: inner@example.org\r\n\r\n'));
    expect(peek.text).toContain(lit('BODY[3.TEXT]', 'inner body'));
    expect(peek.text).toContain(lit('BODY[HEADER.FIELDS (SUBJECT MESSAGE-ID)]', 'Subject: Report =?iso-8859-1?q?f=FCr?= you\r\nMessage-ID: <mixed-1@example.org>\r\n\r\n'));
    expect(peek.text).toContain(lit('BODY[TEXT]<0>', 'preamble'));
    expect(peek.text).not.toContain('\\Seen');
    const full = await c.send('FETCH 3 BODY[]');
    const expected = Buffer.from(message('third', 'Body with 8-bit: café and NUL \x00 bytes.\r\n'));
    expect(full.text).toContain(`BODY[] {${expected.length}}\r\n${expected.toString('latin1')}`);
    expect(full.text).toMatch(/FLAGS \(\\Seen \\Recent\)/);
    const flags = await c.send('FETCH 1:3 FLAGS');
    expect(flags.text).toMatch(/^\* 3 FETCH \(FLAGS \(\\Seen \\Recent\)\)/m);
    expect(flags.text).toMatch(/^\* 1 FETCH \(FLAGS \(\\Recent\)\)/m);
    const rfc = await c.send('FETCH 1 (RFC822.HEADER RFC822.TEXT)');
    expect(rfc.text).toMatch(/RFC822\.HEADER \{\d+\}\r\nFrom: Bob Sender/);
    expect(rfc.text).toContain('RFC822.TEXT {8}\r\nHello.\r\n');
    expect(rfc.text).toMatch(/FLAGS \(\\Seen \\Recent\)/);
  });

  it('FETCH with bad sets or items is BAD and the session goes on', async () => {
    expect((await c.send('FETCH 0 FLAGS')).status).toBe('BAD');
    expect((await c.send('FETCH 1:9 FLAGS')).status).toBe('BAD');
    expect((await c.send('FETCH 1 (FLAGS')).tagged).toMatch(/BAD .*unbalanced parentheses/);
    expect((await c.send('FETCH 1 BODY[FOO]')).status).toBe('BAD');
    expect((await c.send('FETCH 1 NOTANITEM')).status).toBe('BAD');
    expect((await c.send('UID FETCH 999:* UID')).text).toMatch(/^\* 3 FETCH \(UID 3\)/m);
  });

  it('STORE +FLAGS, -FLAGS, FLAGS.SILENT and keywords', async () => {
    const add = await c.send('STORE 1 +FLAGS (\\Flagged $Important)');
    expect(add.text).toMatch(/^\* 1 FETCH \(FLAGS \(([^)]*)\)\)/m);
    expect(add.text).toContain('\\Flagged');
    expect(add.text).toContain('$Important');
    const rm = await c.send('UID STORE 1 -FLAGS (\\Flagged)');
    expect(rm.text).toMatch(/^\* 1 FETCH \(UID 1 FLAGS \(/m);
    expect(rm.text).not.toContain('\\Flagged');
    const silent = await c.send('STORE 1 FLAGS.SILENT (\\Answered \\Seen $Important)');
    expect(silent.text).not.toContain('FETCH');
    const now = /FLAGS \(([^)]*)\)/.exec((await c.send('FETCH 1 FLAGS')).text)![1]!.split(' ').sort();
    expect(now).toEqual(['$Important', '\\Answered', '\\Recent', '\\Seen']);
    expect((await c.send('STORE 1 +FLAGS (\\Recent)')).status).toBe('BAD');
    expect((await c.send('STORE 1 +FLAGS (\\Bogus)')).status).toBe('BAD');
  });

  it('SEARCH keys: flags, headers (decoded), body and text (decoded), dates, sizes, sets, NOT/OR, CHARSET', async () => {
    const s = async (q: string) => {
      const r = await c.send(`SEARCH ${q}`);
      expect(r.status, q).toBe('OK');
      return /^\* SEARCH(.*)\r$/m.exec(r.text)![1]!.trim();
    };
    expect(await s('ALL')).toBe('1 2 3');
    expect(await s('SEEN')).toBe('1 3');
    expect(await s('UNSEEN')).toBe('2');
    expect(await s('ANSWERED')).toBe('1');
    expect(await s('KEYWORD $Important')).toBe('1');
    expect(await s('FROM bob')).toBe('1 3');
    expect((await c.send('SEARCH FROM jürgen')).tagged).toMatch(/BAD .*8-bit/);
    expect(await s('FROM "jürgen"')).toBe('2');
    expect(await s('CHARSET UTF-8 FROM {7+}\r\nJürgen'.replace('{7+}', `{${Buffer.byteLength('Jürgen')}+}`))).toBe('2');
    expect(await s('SUBJECT "für you"')).toBe('2');
    expect(await s('HEADER Message-ID mixed-1')).toBe('2');
    expect(await s('TO "alice@example"')).toBe('1 2 3');
    expect(await s('BODY "grüße aus zürich"')).toBe('2');
    expect(await s('BODY findme-b64')).toBe('');
    expect(await s('TEXT "inner message"')).toBe('2');
    expect(await s('TEXT "Report"')).toBe('2');
    expect(await s('SENTON 10-Nov-2026')).toBe('2');
    expect(await s('SENTBEFORE 11-Nov-2026')).toBe('2');
    expect(await s('SINCE 1-Jan-2020')).toBe('1 2 3');
    expect(await s('BEFORE 1-Jan-2020')).toBe('');
    expect(await s('LARGER 500')).toBe('2');
    expect(await s('SMALLER 500')).toBe('1 3');
    expect(await s('2:3')).toBe('2 3');
    expect(await s('UID 1,3')).toBe('1 3');
    expect(await s('NOT SEEN')).toBe('2');
    expect(await s('OR ANSWERED UNSEEN')).toBe('1 2');
    expect(await s('(FROM bob SEEN) NOT ANSWERED')).toBe('3');
    expect((await c.send('UID SEARCH UNSEEN')).text).toMatch(/^\* SEARCH 2\r$/m);
    expect((await c.send('SEARCH CHARSET KOI8-R ALL')).tagged).toMatch(/NO \[BADCHARSET/);
    expect((await c.send('SEARCH FOOBAR')).status).toBe('BAD');
    expect((await c.send('SEARCH BEFORE 32-Foo-2020')).status).toBe('BAD');
  });

  it('STATUS, CHECK, QUOTA', async () => {
    const st = await c.send('STATUS INBOX (MESSAGES UIDNEXT UIDVALIDITY UNSEEN RECENT HIGHESTMODSEQ)');
    expect(st.text).toMatch(/^\* STATUS "?INBOX"? \(MESSAGES 3 UIDNEXT 4 UIDVALIDITY \d+ UNSEEN 1 RECENT 3 HIGHESTMODSEQ \d+\)/m);
    expect((await c.send('STATUS INBOX (BOGUS)')).status).toBe('BAD');
    expect((await c.send('CHECK')).status).toBe('OK');
    const q = await c.send('GETQUOTAROOT INBOX');
    expect(q.status).toBe('OK');
    expect(q.text).toMatch(/^\* QUOTAROOT "?INBOX"?/m);
    expect((await c.send('SETQUOTA "" (STORAGE 10)')).status).toBe('NO');
  });

  it('APPEND with flags and date: APPENDUID; TRYCREATE for a missing mailbox; EXISTS for the selected one', async () => {
    const msg = message('appended', 'x\r\n');
    const r = await c.send(`APPEND INBOX (\\Seen \\Draft) "05-Nov-2026 10:00:00 +0100" {${msg.length}+}\r\n${msg}`);
    expect(r.tagged).toMatch(/OK \[APPENDUID \d+ 4\]/);
    expect(r.text).toMatch(/^\* 4 EXISTS\r$/m);
    const f = await c.send('FETCH 4 (FLAGS INTERNALDATE)');
    expect(f.text).toContain('INTERNALDATE "05-Nov-2026 09:00:00 +0000"');
    expect(f.text).toMatch(/\\Seen/);
    expect(f.text).toMatch(/\\Draft/);
    const missing = await c.send(`APPEND Nope {${msg.length}+}\r\n${msg}`);
    expect(missing.tagged).toMatch(/NO \[TRYCREATE\]/);
    // Synchronising literal: the server asks for it with "+".
    const tag = c.nextTag();
    c.writeRaw(`${tag} APPEND Sent {${msg.length}}\r\n`);
    expect(await c.readLine()).toMatch(/^\+ /);
    c.writeRaw(`${msg}\r\n`);
    expect((await c.until(tag)).tagged).toMatch(/OK \[APPENDUID \d+ 1\]/);
  });

  it('COPY and MOVE report COPYUID; MOVE expunges from the source', async () => {
    const cp = await c.send('COPY 1:2 Archive');
    expect(cp.tagged).toMatch(/OK \[COPYUID \d+ 1:2 1:2\]/);
    expect((await c.send('COPY 1 Nope')).tagged).toMatch(/NO \[TRYCREATE\]/);
    const mv = await c.send('UID MOVE 4 Trash');
    expect(mv.text).toMatch(/^\* OK \[COPYUID \d+ 4 1\]/m);
    expect(mv.text).toMatch(/^\* 4 EXPUNGE\r$/m);
    expect(mv.status).toBe('OK');
    const st = await c.send('STATUS Archive (MESSAGES)');
    expect(st.text).toContain('MESSAGES 2');
  });

  it('EXPUNGE and UID EXPUNGE remove only \\Deleted messages, with right sequence numbers', async () => {
    await c.send('STORE 1:3 +FLAGS.SILENT (\\Deleted)');
    const uidExp = await c.send('UID EXPUNGE 2');
    expect(uidExp.text).toMatch(/^\* 2 EXPUNGE\r$/m);
    expect(uidExp.text.match(/EXPUNGE\r/g)).toHaveLength(1);
    await c.send('STORE 1 -FLAGS.SILENT (\\Deleted)');
    const exp = await c.send('EXPUNGE');
    // UID 3 is now sequence 2.
    expect(exp.text).toMatch(/^\* 2 EXPUNGE\r$/m);
    const left = await c.send('FETCH 1:* UID');
    // STATUS (HIGHESTMODSEQ) above enabled CONDSTORE (RFC 7162 3.1), so MODSEQ comes along.
    expect(left.text).toMatch(/^\* 1 FETCH \(UID 1( MODSEQ \(\d+\))?\)\r$/m);
    expect(left.text).not.toMatch(/^\* 2 FETCH/m);
  });

  it('CONDSTORE: ENABLE, MODSEQ in FETCH, CHANGEDSINCE, UNCHANGEDSINCE with MODIFIED, SEARCH MODSEQ', async () => {
    expect((await c.send('ENABLE CONDSTORE')).text).toContain('* ENABLED CONDSTORE');
    const a = await c.send('FETCH 1 (MODSEQ)');
    const m1 = Number(/MODSEQ \((\d+)\)/.exec(a.text)![1]);
    const st = await c.send(`STORE 1 (UNCHANGEDSINCE ${m1}) +FLAGS (\\Flagged)`);
    const m2 = Number(/MODSEQ \((\d+)\)/.exec(st.text)![1]);
    expect(m2).toBeGreaterThan(m1);
    const stale = await c.send(`STORE 1 (UNCHANGEDSINCE ${m1}) -FLAGS (\\Flagged)`);
    expect(stale.tagged).toMatch(/OK \[MODIFIED 1\]/);
    expect((await c.send(`FETCH 1:* (FLAGS) (CHANGEDSINCE ${m2 - 1})`)).text).toMatch(/^\* 1 FETCH \(FLAGS \([^)]*\) MODSEQ \(\d+\)\)/m);
    expect((await c.send(`FETCH 1:* (FLAGS) (CHANGEDSINCE ${m2})`)).text).not.toContain('FETCH (');
    expect((await c.send(`SEARCH MODSEQ ${m2}`)).text).toMatch(new RegExp(`^\\* SEARCH 1 \\(MODSEQ ${m2}\\)`, 'm'));
    const sel = await c.send('SELECT INBOX (CONDSTORE)');
    expect(Number(/HIGHESTMODSEQ (\d+)/.exec(sel.text)![1])).toBeGreaterThanOrEqual(m2);
  });

  it('IDLE: + idling, DONE ends it; anything else is BAD', async () => {
    const tag = c.nextTag();
    c.writeRaw(`${tag} IDLE\r\n`);
    expect(await c.readLine()).toBe('+ idling');
    c.writeRaw('DONE\r\n');
    expect((await c.until(tag)).status).toBe('OK');
    const t2 = c.nextTag();
    c.writeRaw(`${t2} IDLE\r\n`);
    await c.readLine();
    c.writeRaw('NOOP\r\n');
    expect((await c.until(t2)).tagged).toMatch(/BAD Expected DONE/);
  });

  it('CLOSE expunges silently and returns to authenticated; UNSELECT does not expunge', async () => {
    await c.send('SELECT Archive');
    await c.send('STORE 1 +FLAGS.SILENT (\\Deleted)');
    const un = await c.send('UNSELECT');
    expect(un.status).toBe('OK');
    expect((await c.send('FETCH 1 FLAGS')).status).toBe('BAD');
    expect((await c.send('STATUS Archive (MESSAGES)')).text).toContain('MESSAGES 2');
    await c.send('SELECT Archive');
    const cl = await c.send('CLOSE');
    expect(cl.text).not.toContain('EXPUNGE');
    expect((await c.send('STATUS Archive (MESSAGES)')).text).toContain('MESSAGES 1');
    await c.send('SELECT INBOX');
  });
});

describe('QUOTA, read-only fetches, sent dates', () => {
  it('reports the store quota (RFC 9208 shape) and refuses APPEND over it with OVERQUOTA', async () => {
    const h2 = await startHarness({ quotaBytes: 4096 });
    try {
      const c = await loggedIn(h2.port, 'alice');
      const msg = message('quota-1', 'x'.repeat(1500) + '\r\n');
      expect((await c.send(`APPEND INBOX {${msg.length}+}\r\n${msg}`)).status).toBe('OK');
      const root = await c.send('GETQUOTAROOT INBOX');
      expect(root.text).toMatch(/^\* QUOTAROOT "?INBOX"? ""\r$/m);
      expect(root.text).toMatch(/^\* QUOTA "" \(STORAGE 2 4\)\r$/m);
      expect((await c.send('GETQUOTA ""')).text).toMatch(/^\* QUOTA "" \(STORAGE 2 4\)\r$/m);
      expect((await c.send('GETQUOTA "other"')).tagged).toMatch(/NO \[NONEXISTENT\]/);
      const big = message('quota-2', 'y'.repeat(3000) + '\r\n');
      expect((await c.send(`APPEND INBOX {${big.length}+}\r\n${big}`)).tagged).toMatch(/NO \[OVERQUOTA\]/);
      expect((await c.send('STATUS INBOX (MESSAGES)')).text).toContain('MESSAGES 1');
      c.close();
    } finally {
      await h2.close();
    }
  });

  it('BODY[] in an EXAMINEd mailbox does not set \\Seen', async () => {
    await h.deliver(['dave'], message('examine-seen'));
    const c = await loggedIn(h.port, 'dave');
    await c.send('EXAMINE INBOX');
    const f = await c.send('FETCH 1:* (FLAGS BODY[HEADER.FIELDS (SUBJECT)])');
    expect(f.text).not.toContain('\\Seen');
    await c.send('SELECT INBOX');
    expect((await c.send('FETCH 1:* FLAGS')).text).not.toContain('\\Seen');
    c.close();
  });

  it('SENTON/SENTBEFORE/SENTSINCE use the date as written in Date:, not its UTC day', async () => {
    const c = await loggedIn(h.port, 'bob');
    await c.send('CREATE SentDates');
    const late = 'From: a@example.org\r\nSubject: late\r\nDate: Tue, 10 Nov 2026 23:30:00 -0500\r\n\r\nx\r\n';
    const early = 'From: a@example.org\r\nSubject: early\r\nDate: Wed, 11 Nov 2026 00:30:00 +0900\r\n\r\nx\r\n';
    const old = 'From: a@example.org\r\nSubject: old\r\nDate: 3 Jan 99 10:00 GMT\r\n\r\nx\r\n';
    for (const m of [late, early, old]) await c.send(`APPEND SentDates {${m.length}+}\r\n${m}`);
    await c.send('SELECT SentDates');
    const s = async (q: string) => /^\* SEARCH(.*)\r$/m.exec((await c.send(`SEARCH ${q}`)).text)![1]!.trim();
    expect(await s('SENTON 10-Nov-2026')).toBe('1');
    expect(await s('SENTON 11-Nov-2026')).toBe('2');
    expect(await s('SENTBEFORE 11-Nov-2026')).toBe('1 3');
    expect(await s('SENTSINCE 11-Nov-2026')).toBe('2');
    expect(await s('SENTON 3-Jan-1999')).toBe('3');
    c.close();
  });
});

describe('bad input and limits', () => {
  it('8-bit atoms, unbalanced parentheses, bad sets: BAD with a reason, then a flood closes', async () => {
    const c = await loggedIn(h.port, 'carol');
    await c.send('SELECT INBOX');
    expect((await c.send('SELECT caf\xc3\xa9')).tagged).toMatch(/BAD .*8-bit/);
    expect((await c.send('FETCH 1:x FLAGS')).tagged).toMatch(/BAD .*sequence set/);
    expect((await c.send('NOOP')).status).toBe('OK');
    // Ten BADs in a row end the session.
    for (let i = 0; i < 9; i++) expect((await c.send('FETCH ((')).status).toBe('BAD');
    const tag = c.nextTag();
    c.writeRaw(`${tag} BLAH\r\n`);
    const text = await c.waitFor((t) => t.includes('* BYE'));
    expect(text).toContain('* BYE Too many invalid commands');
    await c.waitFor(() => c.closed);
  });

  it('more malformed commands: BAD with a reason each, and the session goes on', async () => {
    const c = await loggedIn(h.port, 'dave');
    await c.send('SELECT INBOX');
    await h.deliver(['dave'], message('bad-input'));
    await c.send('NOOP');
    const cases: Array<[string, RegExp]> = [
      ['FETCH 1 (FLAGS))', /BAD .*unbalanced parentheses: unexpected \)/],
      ['SEARCH (ALL', /BAD .*unbalanced parentheses: missing \)/],
      ['FETCH 1,,2 FLAGS', /BAD .*sequence set/],
      ['FETCH 4294967296 FLAGS', /BAD .*sequence set/],
      ['UID FETCH 0:3 FLAGS', /BAD .*sequence set/],
      ['STORE 1 +FLAGS (\\Seen', /BAD .*missing \)/],
      ['LOGIN "unterminated', /BAD .*unterminated quoted string/],
      ['NO\x00OP', /BAD .*invalid character in command name/],
      ['FETCH 1 BODY[HEADER.FIELDS (Subject]', /BAD/],
      ['SELECT', /BAD .*missing arguments/],
      ['NOOP extra', /BAD .*too many arguments/],
      ['UID FROB 1', /BAD Unknown command/],
    ];
    for (const [cmd, re] of cases) {
      const r = await c.send(cmd);
      expect(r.tagged, cmd).toMatch(re);
      // A good command in between keeps the flood counter from closing the session.
      expect((await c.send('NOOP')).status, `NOOP after ${cmd}`).toBe('OK');
    }
    // 8-bit in the tag: the tag cannot be trusted, so the answer is untagged-BAD style.
    c.writeRaw('t\xe9g NOOP\r\n');
    expect(await c.waitFor((t) => /BAD [^\r]*8-bit/.test(t))).toMatch(/\* BAD [^\r]*8-bit characters in tag/);
    c.take();
    expect((await c.send('NOOP')).status).toBe('OK');
    c.close();
  });

  it('a non-synchronising literal past the command limit is skipped whole, then the next command runs', async () => {
    const h2 = await startHarness({ limits: { maxCommandBytes: 4000, maxLiteralBytes: 3000 } });
    try {
      const c = await loggedIn(h2.port, 'alice');
      const tag = c.nextTag();
      // Two literals that are each under the literal limit but together over the command limit.
      c.writeRaw(`${tag} APPEND INBOX (\\Seen) {2500+}\r\n${'a'.repeat(2500)} {2500+}\r\n${'b'.repeat(2500)}\r\n`);
      expect((await c.until(tag)).tagged).toMatch(/BAD command larger than 4000 bytes/);
      expect((await c.send('STATUS INBOX (MESSAGES)')).text).toContain('MESSAGES 0');
      c.close();
    } finally {
      await h2.close();
    }
  });

  it('refuses a literal above the limit and an over-long line, then goes on', async () => {
    const h2 = await startHarness({ limits: { maxLiteralBytes: 1000, maxLineBytes: 2000 } });
    try {
      const c = await loggedIn(h2.port, 'alice');
      const big = await c.send('APPEND INBOX {5000}');
      expect(big.tagged).toMatch(/BAD literal of 5000 bytes is larger than the limit/);
      const tag = c.nextTag();
      c.writeRaw(`${tag} APPEND INBOX {3000+}\r\n${'x'.repeat(3000)}\r\n`);
      expect((await c.until(tag)).status).toBe('BAD');
      const long = await c.send(`LIST "" ${'a'.repeat(5000)}`);
      expect(long.tagged).toMatch(/BAD line longer than 2000 bytes/);
      expect((await c.send('NOOP')).status).toBe('OK');
      c.close();
    } finally {
      await h2.close();
    }
  });

  it('closes idle sessions with BYE and limits sessions per user', async () => {
    const h2 = await startHarness({ idleTimeoutMs: 300, limits: { maxSessionsPerUser: 2 } });
    try {
      const a = await loggedIn(h2.port, 'alice');
      const b = await loggedIn(h2.port, 'alice');
      const third = await RawClient.connect(h2.port);
      expect((await third.send('LOGIN alice alice-pw')).tagged).toMatch(/NO \[LIMIT\]/);
      expect(await a.waitFor((t) => t.includes('* BYE'), 3000)).toContain('* BYE Autologout');
      await a.waitFor(() => a.closed);
      b.close();
      third.close();
      expect(h2.logs.join('\n')).toContain('idle timeout');
    } finally {
      await h2.close();
    }
  });

  it('the idle timeout counts client input only: an IDLE fed with updates still ends, with keepalives meanwhile', async () => {
    const h2 = await startHarness({ idleTimeoutMs: 600, idleKeepaliveMs: 150 });
    try {
      const c = await loggedIn(h2.port, 'alice');
      await c.send('SELECT INBOX');
      const tag = c.nextTag();
      c.writeRaw(`${tag} IDLE\r\n`);
      expect(await c.readLine()).toBe('+ idling');
      // Server output every 100 ms (deliveries reported in IDLE) must not keep the session alive.
      // The feed is bounded by count (30 deliveries, at least 3 s: five idle timeouts), not by the
      // clock, so a loaded machine only makes it longer; the session must end while it still runs.
      let n = 0;
      while (!c.closed && n < 30) {
        await h2.deliver(['alice'], message(`idle-feed-${n++}`));
        await new Promise((r) => setTimeout(r, 100));
      }
      const text = await c.waitFor((t) => t.includes('* BYE'), 3000);
      expect(text).toMatch(/\* \d+ EXISTS/);
      expect(text).toContain('* OK Still here');
      expect(text).toContain('* BYE Autologout');
      expect(n, 'the session ended while the server was still sending it updates').toBeLessThan(30);
      await c.waitFor(() => c.closed);
    } finally {
      await h2.close();
    }
  });

  it('AUTHENTICATE waiting for the client\'s response ends with the idle timeout', async () => {
    const h2 = await startHarness({ idleTimeoutMs: 300 });
    try {
      const c = await RawClient.connect(h2.port);
      const tag = c.nextTag();
      c.writeRaw(`${tag} AUTHENTICATE PLAIN\r\n`);
      expect(await c.readLine()).toBe('+ ');
      expect(await c.waitFor((t) => t.includes('* BYE'), 3000)).toContain('* BYE Autologout');
    } finally {
      await h2.close();
    }
  });

  it('before login only whole commands count, and the pre-login bound is shorter: a client trickling a line it never finishes gets BYE', async () => {
    const h2 = await startHarness({ idleTimeoutMs: 60_000, limits: { preLoginIdleMs: 500 } });
    try {
      const c = await RawClient.connect(h2.port);
      // A byte every 100 ms of a LOGIN line that never ends: activity by bytes, idle by commands.
      const text = 'a1 LOGIN alice alice-pw';
      let i = 0;
      for (; i < 40 && !c.closed; i++) {
        c.writeRaw(text[i % text.length]!);
        await new Promise((r) => setTimeout(r, 100));
      }
      expect(await c.waitFor((t) => t.includes('* BYE'), 3000)).toContain('* BYE Autologout');
      expect(i, 'cut while it was still trickling').toBeLessThan(40);
      expect(h2.logs.some((l) => /"msg":"idle timeout"/.test(l) && /"state":"not-authenticated"/.test(l))).toBe(true);
      // Logged in, the autologout time applies (60 s here), not the pre-login bound.
      const d = await loggedIn(h2.port, 'alice');
      await new Promise((r) => setTimeout(r, 1000));
      expect((await d.send('NOOP')).tagged).toMatch(/ OK /);
      d.close();
    } finally {
      await h2.close();
    }
  });

  it('a FETCH still sending to a slow but steady reader is cut neither by the idle timeout nor as a stalled reader', async () => {
    const h2 = await startHarness({ idleTimeoutMs: 300 });
    try {
      // 32 MiB: far more than the socket buffers hold, so the server waits for the reader.
      const big = Buffer.from(message('big', 'y'.repeat(78) + '\r\n').replace(/\r\n\r\n.*$/s, '\r\n\r\n') + ('y'.repeat(78) + '\r\n').repeat(32 * 13_108));
      await h2.deliver(['alice'], big);
      const sock = net.connect({ port: h2.port, host: '127.0.0.1' });
      let received = 0;
      let tail = '';
      sock.on('data', (d: Buffer) => {
        received += d.length;
        tail = (tail + d.subarray(-300).toString('latin1')).slice(-300);
      });
      await new Promise((r) => sock.once('connect', r));
      sock.write('a LOGIN alice alice-pw\r\nb SELECT INBOX\r\nc FETCH 1 BODY.PEEK[]\r\n');
      const t0 = Date.now();
      // Read in short bursts with pauses shorter than the timeout, for longer than the timeout in all.
      while (!/\r\nc (OK|NO|BAD)[^\r]*\r\n/.test(tail) && Date.now() - t0 < 30_000) {
        sock.pause();
        await new Promise((r) => setTimeout(r, 150));
        sock.resume();
        await new Promise((r) => setTimeout(r, 40));
      }
      expect(Date.now() - t0).toBeGreaterThan(300);
      // The whole body and the tagged OK; an autologout may follow it (no input since), never cut into it.
      expect(tail).toMatch(/\r\nc OK Fetch completed\r\n(\* BYE Autologout[^\r]*\r\n)?$/);
      expect(received).toBeGreaterThan(big.length);
      sock.destroy();
    } finally {
      await h2.close();
    }
  });

  it('a client that stops reading in the middle of a big FETCH is closed', async () => {
    const h2 = await startHarness({ idleTimeoutMs: 300 });
    try {
      await h2.deliver(['alice'], Buffer.from(message('stalled', ('z'.repeat(78) + '\r\n').repeat(16 * 13_108))));
      const sock = net.connect({ port: h2.port, host: '127.0.0.1' });
      await new Promise((r) => sock.once('connect', r));
      sock.on('error', () => undefined);
      sock.pause();
      sock.write('a LOGIN alice alice-pw\r\nb SELECT INBOX\r\nc FETCH 1 BODY.PEEK[]\r\n');
      const closed = new Promise<void>((r) => sock.once('close', () => r()));
      // Never read: the server gives up after an idle timeout without progress.
      const deadline = Date.now() + 5000;
      while (!h2.logs.some((l) => l.includes('client stopped reading')) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
      expect(h2.logs.join('\n')).toContain('client stopped reading');
      sock.resume();
      await closed;
      expect(h2.server.sessions()).toBe(0);
    } finally {
      await h2.close();
    }
  });

  it('closes the session after three failed logins', async () => {
    const c = await RawClient.connect(h.port);
    expect((await c.send('LOGIN alice nope1')).tagged).toMatch(/NO \[AUTHENTICATIONFAILED\]/);
    expect((await c.send(`AUTHENTICATE PLAIN ${plain('', 'alice', 'nope2')}`)).tagged).toMatch(/NO \[AUTHENTICATIONFAILED\]/);
    const third = await c.send('LOGIN alice nope3');
    expect(third.tagged).toMatch(/NO \[AUTHENTICATIONFAILED\]/);
    expect(await c.waitFor((t) => t.includes('* BYE'), 3000)).toContain('* BYE Too many authentication failures');
    await c.waitFor(() => c.closed);
  });

  it('counts sessions and commands in metrics', async () => {
    const text = await h.registry.metrics();
    expect(text).toMatch(/pairgate_sessions\{protocol="imap"\} \d+/);
    expect(text).toMatch(/pairgate_sessions_total\{protocol="imap"\} [1-9]/);
    expect(text).toMatch(/pairgate_imap_commands_total\{command="FETCH",result="OK"\} [1-9]/);
    expect(text).toMatch(/pairgate_imap_commands_total\{command="UID FETCH",result="OK"\} [1-9]/);
    expect(text).toMatch(/pairgate_imap_commands_total\{command="[A-Z ]+",result="BAD"\} [1-9]/);
  });
});
