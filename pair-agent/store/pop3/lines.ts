/**
 * POP3 input: a pure line splitter fed byte chunks, bounded by the limits below. An over-long
 * line is reported once and its remainder skipped up to the next line end, so that a flood
 * never grows a buffer.
 */
export interface Pop3Limits {
  /** Longest command line in bytes (RFC 2449 allows 255; SASL responses need more). */
  maxLineBytes: number;
  /** Commands queued while one runs (PIPELINING). */
  maxPipelined: number;
  /** Bad commands in a row before the connection is closed. */
  maxBadCommands: number;
  /** Output buffered for a slow reader before the session stops reading commands. */
  maxBufferedOutput: number;
}

export const POP3_LIMITS: Pop3Limits = {
  maxLineBytes: 8192,
  maxPipelined: 200,
  maxBadCommands: 10,
  maxBufferedOutput: 4 * 1024 * 1024,
};

export type LineEvent = { kind: 'line'; line: string } | { kind: 'too-long'; bytes: number };

export class LineReader {
  private buf: Buffer = Buffer.alloc(0);
  private skipping = false;
  private skipped = 0;

  constructor(private readonly limits: Pop3Limits = POP3_LIMITS) {}

  push(chunk: Buffer): LineEvent[] {
    const out: LineEvent[] = [];
    let data = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    for (;;) {
      const nl = data.indexOf(0x0a);
      if (nl < 0) {
        if (this.skipping) {
          this.skipped += data.length;
          data = Buffer.alloc(0);
        } else if (data.length > this.limits.maxLineBytes) {
          this.skipping = true;
          this.skipped = data.length;
          data = Buffer.alloc(0);
        }
        break;
      }
      const raw = data.subarray(0, nl);
      data = data.subarray(nl + 1);
      if (this.skipping) {
        out.push({ kind: 'too-long', bytes: this.skipped + raw.length + 1 });
        this.skipping = false;
        this.skipped = 0;
        continue;
      }
      if (raw.length > this.limits.maxLineBytes) {
        out.push({ kind: 'too-long', bytes: raw.length + 1 });
        continue;
      }
      const end = raw.length && raw[raw.length - 1] === 0x0d ? raw.length - 1 : raw.length;
      out.push({ kind: 'line', line: raw.toString('utf8', 0, end) });
    }
    this.buf = Buffer.from(data);
    return out;
  }
}
