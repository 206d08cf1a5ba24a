/**
 * A faster DATA-phase scan for smtp-server's SMTPStream, installed by the store's LMTP server.
 *
 * smtp-server 3.21's `_feedDataStream` looks for the end of DATA ("\r\n.\r\n") and for escape
 * dots by testing every byte of the message in a JavaScript loop; for a 1 MiB delivery that was
 * the largest single CPU cost of the store's LMTP server (bench/store, STORE_BENCH_PROF). This is
 * the same function with that loop replaced by `Buffer.indexOf` of "\n." (a native search), which
 * visits exactly the same candidate positions in the same order, and without the copy of every
 * chunk behind the 4 bytes held back from the previous one (feedAfterCarry) when no candidate
 * lies at that boundary; otherwise, including the start-of-DATA handling, it is unchanged.
 *
 * It is installed only over the exact function it was written against (a digest of its source):
 * any other version of smtp-server keeps its own code. The test suite checks both against each
 * other on random chunkings of messages full of dots and terminators.
 */
import { createHash } from 'node:crypto';
import { SMTPStream } from 'smtp-server/lib/smtp-stream.js';

/** SHA-256 of `SMTPStream.prototype._feedDataStream.toString()` in smtp-server 3.21.6. */
const KNOWN_SOURCE = '9d8b903f9a3a63542d72e19a9e2f67009a3b1107a28d57e8e7369355454ff230';
const END_SEQUENCE = Buffer.from('\r\n.\r\n');
const DOT_AT_LINE_START = Buffer.from('\n.');
const DATA_START_END = Buffer.from('.\r\n');

type Done = (err?: Error | null) => void;
interface StreamInternals {
  _dataStream: (NodeJS.WritableStream & { writable: boolean; destroyed: boolean }) | null;
  _lastBytes: Buffer | false;
  _atDataStart: boolean;
  _countDataBytes(len: number): void;
  _endDataMode(chunk: Buffer | false, remainder: Buffer, done: Done): void;
  _feedDataStream(chunk: Buffer, done: Done): void;
}

/** smtp-server's original, kept for the equivalence test. */
export const originalFeedDataStream = (SMTPStream.prototype as unknown as StreamInternals)._feedDataStream;

export function fastFeedDataStream(this: StreamInternals, chunk: Buffer, done: Done): void {
  const dataStream = this._dataStream!;
  const carry = this._lastBytes;
  if (carry && carry.length && chunk.length >= 16 && !this._atDataStart && noCandidateNear(carry, chunk)) {
    this._lastBytes = false;
    feedAfterCarry.call(this, carry, chunk, done);
    return;
  }
  if (this._lastBytes && this._lastBytes.length) {
    chunk = Buffer.concat([this._lastBytes, chunk], this._lastBytes.length + chunk.length);
    this._lastBytes = false;
  }
  let len = chunk.length;
  // the data must not start with the end terminator (see smtp-server: only while _atDataStart)
  if (this._atDataStart && len >= 3 && Buffer.compare(chunk.subarray(0, 3), DATA_START_END) === 0) {
    this._endDataMode(false, chunk.subarray(3), done);
    return;
  }
  // an escape dot as the first byte
  if (this._atDataStart && len >= 2 && chunk[0] === 0x2e && chunk[1] === 0x2e) {
    chunk = chunk.subarray(1);
    len--;
    this._atDataStart = false;
  }
  // Every i in [2, len - 2) with chunk[i - 1] = "\n" and chunk[i] = ".", in order (the original loop's candidates).
  for (let nl = chunk.indexOf(DOT_AT_LINE_START, 1); nl >= 0; nl = chunk.indexOf(DOT_AT_LINE_START, nl + 1)) {
    const i = nl + 1;
    if (i >= len - 2) break;
    if (Buffer.compare(chunk.subarray(i - 2, i + 3), END_SEQUENCE) === 0) {
      const buf = chunk.subarray(0, i);
      this._countDataBytes(buf.length);
      this._endDataMode(buf, chunk.subarray(i + 3), done);
      return;
    }
    if (chunk[i + 1] === 0x2e) {
      const buf = chunk.subarray(0, i);
      this._lastBytes = false;
      this._countDataBytes(buf.length);
      if (dataStream.writable) dataStream.write(buf);
      const rest = chunk.subarray(i + 1);
      setImmediate(() => this._feedDataStream(rest, done));
      return;
    }
  }
  // keep the last bytes
  this._lastBytes = chunk.length < 4 ? chunk : chunk.subarray(chunk.length - 4);
  if (this._lastBytes.length < chunk.length) {
    const buf = chunk.subarray(0, chunk.length - this._lastBytes.length);
    this._countDataBytes(buf.length);
    if (dataStream.writable) return doneWhenDrained(dataStream, dataStream.write(buf), done);
    return done();
  } else return done();
}

/** Calls `done` at once, or once the data stream drains (or closes) after a write it buffered. */
function doneWhenDrained(dataStream: NonNullable<StreamInternals['_dataStream']>, handled: boolean, done: Done): void {
  if (handled || dataStream.destroyed) return done();
  const onDrain = () => {
    dataStream.removeListener('drain', onDrain);
    dataStream.removeListener('close', onDrain);
    done();
  };
  dataStream.once('drain', onDrain);
  dataStream.once('close', onDrain);
}

/**
 * True when the up to 4 bytes held back from the last chunk (`carry`) and the first 8 bytes of
 * `chunk` hold no "\n." whose dot sits at index 2..carry+5 of carry+chunk: then every candidate
 * of the original's scan over carry+chunk lies at index 6 or later of `chunk` alone.
 */
function noCandidateNear(carry: Buffer, chunk: Buffer): boolean {
  const head = Buffer.concat([carry, chunk.subarray(0, 8)]);
  for (let i = 2; i <= carry.length + 5; i++) if (head[i] === 0x2e && head[i - 1] === 0x0a) return false;
  return true;
}

/**
 * The original's result for carry+chunk without copying `chunk` behind the carry (for a 1 MiB
 * message that concatenation copied the whole message once more): what it would emit as one
 * buffer is emitted as the carry, then the part of `chunk`; the data stream's reader sees the
 * same bytes in the same order. Only called when noCandidateNear(carry, chunk) and not at the
 * start of DATA.
 */
function feedAfterCarry(this: StreamInternals, carry: Buffer, chunk: Buffer, done: Done): void {
  const dataStream = this._dataStream!;
  const len = chunk.length;
  // candidates j in [6, len - 2) of chunk (index carry.length + j of carry+chunk)
  for (let nl = chunk.indexOf(DOT_AT_LINE_START, 5); nl >= 0; nl = chunk.indexOf(DOT_AT_LINE_START, nl + 1)) {
    const j = nl + 1;
    if (j >= len - 2) break;
    if (Buffer.compare(chunk.subarray(j - 2, j + 3), END_SEQUENCE) === 0) {
      this._countDataBytes(carry.length + j);
      if (dataStream.writable) dataStream.write(carry);
      this._endDataMode(chunk.subarray(0, j), chunk.subarray(j + 3), done);
      return;
    }
    if (chunk[j + 1] === 0x2e) {
      this._countDataBytes(carry.length + j);
      if (dataStream.writable) {
        dataStream.write(carry);
        dataStream.write(chunk.subarray(0, j));
      }
      const rest = chunk.subarray(j + 1);
      setImmediate(() => this._feedDataStream(rest, done));
      return;
    }
  }
  this._lastBytes = chunk.subarray(len - 4);
  this._countDataBytes(carry.length + len - 4);
  if (!dataStream.writable) return done();
  dataStream.write(carry);
  doneWhenDrained(dataStream, dataStream.write(chunk.subarray(0, len - 4)), done);
}

let installed: boolean | null = null;

/** Installs the fast scan when smtp-server's function is the one it replaces; says whether it is in use. */
export function installFastDataScan(): boolean {
  if (installed !== null) return installed;
  const proto = SMTPStream.prototype as unknown as StreamInternals;
  installed = createHash('sha256').update(String(originalFeedDataStream)).digest('hex') === KNOWN_SOURCE;
  if (installed) proto._feedDataStream = fastFeedDataStream;
  return installed;
}
