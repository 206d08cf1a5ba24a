/** Pure pieces of the store's protocol servers: POP3 line splitting, dot-stuffing, TOP, LMTP delivery ids. */
import { describe, expect, it } from 'vitest';
import { LineReader } from '../../pair-agent/store/pop3/lines.ts';
import { stuff, top, uidlOf } from '../../pair-agent/store/pop3/session.ts';
import net from 'node:net';
import { coalesceWrites, deliveryIdFromHeaders, envelopeDigest, localPart } from '../../pair-agent/store/lmtp.ts';
import { checkMailbox, normalizeFlags } from '../../pair-agent/store/names.ts';

function feed(input: Buffer, size: number, limit = 64) {
  const r = new LineReader({ maxLineBytes: limit, maxPipelined: 10, maxBadCommands: 10, maxBufferedOutput: 1 << 20 });
  const out = [];
  for (let i = 0; i < input.length; i += size) out.push(...r.push(input.subarray(i, i + size)));
  return out;
}

describe('POP3 line reader', () => {
  const input = Buffer.from(`USER a\r\nPASS b c\r\n${'x'.repeat(500)}\r\nNOOP\nQUIT\r\n`);
  for (const size of [1, 3, 17, input.length]) {
    it(`splits lines and bounds long ones in chunks of ${size}`, () => {
      const out = feed(input, size);
      expect(out.map((e) => (e.kind === 'line' ? e.line : `<too-long>`))).toEqual(['USER a', 'PASS b c', '<too-long>', 'NOOP', 'QUIT']);
    });
  }
  it('survives a seeded random byte stream without growing', () => {
    let s = 12345;
    const rnd = () => ((s = (s * 1103515245 + 12345) >>> 0) >>> 16) & 0xff;
    const r = new LineReader({ maxLineBytes: 100, maxPipelined: 10, maxBadCommands: 10, maxBufferedOutput: 1 << 20 });
    for (let i = 0; i < 2000; i++) {
      const chunk = Buffer.from(Array.from({ length: 1 + (rnd() % 64) }, () => (rnd() % 40 === 0 ? 10 : rnd())));
      for (const e of r.push(chunk)) if (e.kind === 'line') expect(Buffer.byteLength(e.line)).toBeLessThanOrEqual(100 * 3);
      expect((r as unknown as { buf: Buffer }).buf.length).toBeLessThanOrEqual(101 + 64);
    }
  });
});

describe('POP3 message output', () => {
  it('dot-stuffs, normalises bare LF, ends with CRLF', () => {
    expect(stuff(Buffer.from('a\r\n.b\r\n..c\nd')).toString()).toBe('a\r\n..b\r\n...c\r\nd\r\n');
    expect(stuff(Buffer.from('.x')).toString()).toBe('..x\r\n');
  });
  it('TOP returns headers, the blank line and n body lines', () => {
    const m = Buffer.from('A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\nl3\r\n');
    expect(top(m, 0).toString()).toBe('A: 1\r\nB: 2\r\n\r\n');
    expect(top(m, 2).toString()).toBe('A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n');
    expect(top(m, 99).toString()).toBe(m.toString());
  });
  it('UIDL is uid and uidvalidity in upper-case hex, as Dovecot pop3_uidl_format=%08Xu%08Xv', () => {
    expect(uidlOf(26, 1700000000)).toBe('0000001A6553F100');
  });
});

describe('LMTP delivery ids and names', () => {
  it('takes the proxy header, folded or not, and falls back to a digest', () => {
    expect(deliveryIdFromHeaders(Buffer.from('Subject: x\r\nX-Pairgate-Delivery-Id: abc-123\r\n\r\nbody'))).toBe('abc-123');
    expect(deliveryIdFromHeaders(Buffer.from('x-pairgate-delivery-id:\r\n  folded\r\n\r\n'))).toBe('folded');
    expect(deliveryIdFromHeaders(Buffer.from('Subject: x\r\n\r\nX-Pairgate-Delivery-Id: in-body\r\n'))).toBeNull();
    expect(deliveryIdFromHeaders(Buffer.from('X-Pairgate-Delivery-Id: has space\r\n\r\n'))).toBeNull();
    const a = envelopeDigest('f@x', ['b@x', 'a@x'], 'ab12');
    expect(a).toBe(envelopeDigest('f@x', ['a@x', 'b@x'], 'ab12'));
    expect(a).not.toBe(envelopeDigest('g@x', ['a@x', 'b@x'], 'ab12'));
    expect(a).not.toBe(envelopeDigest('f@x', ['a@x', 'b@x'], 'ab13'));
    expect(localPart('Alice@Example.NET')).toBe('alice');
  });
  it('finds the same delivery id in a body given as parts, however it is cut', () => {
    const bodies = [
      Buffer.from('Subject: x\r\nX-Pairgate-Delivery-Id: abc-123\r\n\r\nbody'),
      Buffer.from('Subject: x\r\n\r\nX-Pairgate-Delivery-Id: in-body\r\n'),
      Buffer.from('Subject: x\nX-Pairgate-Delivery-Id: lf-only\n\nbody\r\n\r\nX-Pairgate-Delivery-Id: later\r\n'),
      // a header block longer than the 64 KiB looked at first
      Buffer.concat([Buffer.from('X-Pad: '), Buffer.alloc(70_000, 'p'), Buffer.from('\r\nX-Pairgate-Delivery-Id: far\r\n\r\nbody')]),
      Buffer.concat([Buffer.from('X-Pairgate-Delivery-Id: no-end\r\n'), Buffer.alloc(70_000, 'q')]),
    ];
    let seed = 7;
    const rand = (n: number) => ((seed = (seed * 1103515245 + 12345) % 2 ** 31), seed % n);
    for (const body of bodies) {
      const want = deliveryIdFromHeaders(body);
      for (let round = 0; round < 40; round++) {
        const parts: Buffer[] = [];
        for (let at = 0; at < body.length; ) {
          const n = Math.min(body.length - at, 1 + rand(round % 2 ? 40 : 40_000));
          parts.push(body.subarray(at, at + n));
          at += n;
        }
        expect(deliveryIdFromHeaders(parts)).toBe(want);
      }
    }
    expect(bodies.map((b) => deliveryIdFromHeaders(b))).toEqual(['abc-123', null, 'lf-only', 'far', 'no-end']);
  });
  it('sends the replies written in one tick with one write, in order, and flushes them on end', async () => {
    const got: Buffer[] = [];
    const server = net.createServer((sock) => {
      coalesceWrites(sock);
      const calls: number[] = [];
      const s = sock as unknown as { _writev: (c: unknown[], cb: () => void) => void; _write: (...a: unknown[]) => void };
      const writev = s._writev.bind(sock);
      const write1 = s._write.bind(sock);
      s._writev = (chunks, cb) => (calls.push(chunks.length), writev(chunks, cb));
      s._write = (...a) => (calls.push(1), write1(...a));
      sock.write('250 2.1.0 Accepted\r\n');
      sock.write('250 2.1.5 Accepted\r\n');
      sock.write('354 End data with <CR><LF>.<CR><LF>\r\n');
      setImmediate(() => {
        expect(calls).toEqual([3]);
        sock.write('250 2.0.0 Saved\r\n');
        sock.end('221 Bye\r\n');
      });
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const port = (server.address() as net.AddressInfo).port;
    const c = net.connect(port, '127.0.0.1');
    c.on('data', (d: Buffer) => got.push(d));
    await new Promise((r) => c.on('end', r));
    c.destroy();
    await new Promise((r) => server.close(r));
    expect(Buffer.concat(got).toString()).toBe(
      '250 2.1.0 Accepted\r\n250 2.1.5 Accepted\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Saved\r\n221 Bye\r\n',
    );
  });
  it('refuses mailbox path tricks and normalises flags', () => {
    for (const bad of ['../x', 'a/../b', '/abs', 'a//b', 'a/', 'a\u0000b', 'x*', '']) expect(() => checkMailbox(bad), bad).toThrow();
    expect(checkMailbox('inbox/Sub')).toBe('INBOX/Sub');
    expect(normalizeFlags(['\\seen', '\\Recent', 'kw', 'KW', '\\FLAGGED'])).toEqual(['\\Seen', 'kw', '\\Flagged']);
    expect(() => normalizeFlags(['\\Bogus'])).toThrow();
  });
});
