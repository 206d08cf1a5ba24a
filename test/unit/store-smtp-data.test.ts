/**
 * The store's faster DATA scan (pair-agent/store/smtp-data.ts) against smtp-server's own
 * `_feedDataStream`: the same commands and the same message bytes for seeded random sessions
 * (dot-stuffed lines, bare dots, LF-only lines, terminators split across chunks, pipelined
 * commands after the message), fed in random chunkings.
 */
import { describe, expect, it } from 'vitest';
import { createHash } from 'node:crypto';
import { SMTPStream } from 'smtp-server/lib/smtp-stream.js';
import { fastFeedDataStream, installFastDataScan, originalFeedDataStream } from '../../pair-agent/store/smtp-data.ts';

type Feed = typeof originalFeedDataStream;

/** Runs `chunks` through an SMTPStream using `feed`; returns what the application saw. */
async function transcript(feed: Feed, chunks: Buffer[]): Promise<string[]> {
  const out: string[] = [];
  const s = new SMTPStream();
  (s as unknown as { _feedDataStream: Feed })._feedDataStream = feed;
  s.oncommand = (cmd: Buffer, cb?: () => void) => {
    const line = cmd.toString('latin1');
    out.push(`cmd ${line}`);
    if (line === 'DATA') {
      const ds = s.startDataMode();
      const parts: Buffer[] = [];
      ds.on('data', (d: Buffer) => parts.push(d));
      ds.on('end', () => {
        const body = Buffer.concat(parts);
        out.push(`data ${body.length} ${createHash('sha256').update(body).digest('hex')}`);
        setImmediate(() => s.continue());
      });
    }
    cb?.();
  };
  for (const c of chunks) await new Promise<void>((resolve, reject) => s.write(c, (err) => (err ? reject(err) : resolve())));
  await new Promise<void>((resolve) => s.end(resolve));
  await new Promise((r) => setImmediate(r));
  return out;
}

function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x100000000;
  };
}

function session(r: () => number): Buffer {
  const pieces = ['.', '..', '...', '.\r\n', 'text', ' ', '\r\n', '\n', '\r', '\r\n.\r\n', 'x.y', '\r\n..', '\r\n.'];
  let s = 'LHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n';
  // One message per session: a second DATA pipelined behind a message stalls SMTPStream driven
  // synchronously like this (with either scan), which is not what is compared here.
  const n = Math.floor(r() * 60);
  for (let i = 0; i < n; i++) s += pieces[Math.floor(r() * pieces.length)];
  if (r() < 0.2) s += 'filler line '.repeat(Math.floor(r() * 1000)) + '\r\n';
  s += '\r\n.\r\nNOOP\r\nQUIT\r\n';
  return Buffer.from(s, 'latin1');
}

function chunked(b: Buffer, r: () => number): Buffer[] {
  const out: Buffer[] = [];
  // tiny chunks, chunks of a few dozen bytes (bytes held back at every boundary), large ones
  const max = [8, 48, 70_000][Math.floor(r() * 3)]!;
  for (let at = 0; at < b.length; ) {
    const n = 1 + Math.floor(r() * max);
    out.push(b.subarray(at, at + n));
    at += n;
  }
  return out;
}

describe('store LMTP: fast DATA scan', () => {
  it('is installed over smtp-server 3.21.6', () => {
    expect(installFastDataScan()).toBe(true);
    expect((SMTPStream.prototype as unknown as { _feedDataStream: Feed })._feedDataStream).toBe(fastFeedDataStream);
  });

  it('gives the same commands and message bytes as smtp-server for random sessions and chunkings (seeded)', async () => {
    const seed = Number(process.env.STORE_FUZZ_SEED ?? Date.now() % 100_000);
    console.log(`smtp data scan seed: ${seed} (STORE_FUZZ_SEED=${seed})`);
    const r = rng(seed);
    let messages = 0;
    for (let round = 0; round < 600; round++) {
      const chunks = chunked(session(r), r);
      const want = await transcript(originalFeedDataStream, chunks);
      const got = await transcript(fastFeedDataStream, chunks);
      expect(got, `round ${round}`).toEqual(want);
      messages += want.filter((l) => l.startsWith('data ')).length;
    }
    expect(messages).toBe(600);
  });

  it('unstuffs dots and stops at the terminator, as RFC 5321 4.5.2 says', async () => {
    const input = Buffer.from('DATA\r\n..leading\r\nmid.dle\r\n...\r\n.\r\nQUIT\r\n', 'latin1');
    const body = Buffer.from('.leading\r\nmid.dle\r\n..\r\n', 'latin1');
    const want = ['cmd DATA', `data ${body.length} ${createHash('sha256').update(body).digest('hex')}`, 'cmd QUIT'];
    for (const size of [1, 2, 3, 5, 1000]) {
      const chunks: Buffer[] = [];
      for (let at = 0; at < input.length; at += size) chunks.push(input.subarray(at, at + size));
      expect(await transcript(fastFeedDataStream, chunks)).toEqual(want);
    }
  });
});
