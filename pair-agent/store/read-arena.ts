/**
 * Socket reads of an LMTP connection into slabs the process reuses, instead of the fresh 64 KiB
 * buffer Node allocates for every read of a socket. A 1 MiB delivery is 16-32 reads; kept in the
 * delivery's parts until the body is durable, those buffers outlive V8's young generation, and
 * their memory was what set off most of the store's full mark-compacts (one every ~16 deliveries
 * of 1 MiB in bench/store, each a few ms of the event loop that every connection waits on).
 *
 * The bytes a read delivers are a view into the arena's current slab; a full slab is retired.
 * The connection calls `recycle()` at a point where no view of what it read before is held by
 * anyone: the start of the next message's DATA. By then smtp-server has turned every command
 * line into a string, the previous delivery has been answered after deliver() resolved (so the
 * store holds none of its buffers: see BodyData), and nothing of that DATA is left in
 * smtp-server; and provided every byte read so far has reached smtp-server's parser (`consumed`),
 * none waits in a stream buffer. Retired slabs then go back to the pool; the current slab is kept
 * as it is (the next read's buffer has already been handed to Node). A delivery that failed, or a
 * connection that closed, abandons its slabs instead: its writes may still be in flight.
 */

/** Slab size: a few reads each. */
export const SLAB_BYTES = 256 * 1024;
/** A read is given at least this much room; a shorter tail retires the slab. */
const MIN_READ_BYTES = 64 * 1024;
/** Free slabs the process keeps for reuse (16 MiB); more are left to the GC. */
const POOL_KEEP = 64;

const pool: Buffer[] = [];

/** Free slabs in the pool now (for a gauge). */
export function pooledSlabs(): number {
  return pool.length;
}

/** What an arena tells its owner, for metrics: a slab taken (fresh or from the pool), slabs left to the GC. */
export interface ArenaEvents {
  took(reused: boolean): void;
  dropped(slabs: number): void;
}

export class ReadArena {
  private slab: Buffer | null = null;
  private used = 0;
  private retired: Buffer[] = [];
  /** A slab abandoned while Node still held its tail for the next read: reads go on into it, but it never goes to the pool. */
  private keptOut: Buffer | null = null;
  /** Bytes handed out (took) and bytes the reader has taken in (consumed): equal when none wait in between. */
  private handed = 0;
  private taken = 0;

  constructor(private readonly events?: ArenaEvents) {}

  /** Node's `onread.buffer`: where the next read goes. */
  next(): Buffer {
    if (!this.slab || this.slab.length - this.used < MIN_READ_BYTES) {
      if (this.slab && this.slab !== this.keptOut) this.retired.push(this.slab);
      this.keptOut = null;
      const pooled = pool.pop();
      this.slab = pooled ?? Buffer.allocUnsafeSlow(SLAB_BYTES);
      this.used = 0;
      this.events?.took(pooled !== undefined);
    }
    return this.slab.subarray(this.used);
  }

  /** The `nread` bytes just read into `next()`'s buffer, as a view the arena will not hand out again before `recycle()`. */
  took(nread: number): Buffer {
    const view = this.slab!.subarray(this.used, this.used + nread);
    this.used += nread;
    this.handed += nread;
    return view;
  }

  /** The reader has taken in `n` more of the bytes handed out (smtp-server's parser started on a chunk). */
  consumed(n: number): void {
    this.taken += n;
  }

  /**
   * The owner holds no view of anything read before now: the retired slabs go back to the pool,
   * unless bytes read before now still wait for the reader (a client that sent ahead of the
   * server's replies), in which case they stay as they are until a later call.
   */
  recycle(): void {
    if (this.taken !== this.handed) return;
    for (const s of this.retired) if (pool.length < POOL_KEEP) pool.push(s);
    this.retired = [];
  }

  /**
   * Lets go of every slab without pooling it (the GC frees each once nothing refers to it): for
   * when views may still be in use, such as a delivery that failed while its writes were in
   * flight, or whose client went away after the final dot.
   */
  abandon(): void {
    const dropped = this.retired.length + (this.slab && this.slab !== this.keptOut ? 1 : 0);
    if (dropped) this.events?.dropped(dropped);
    this.retired = [];
    // Node already holds the rest of the current slab as the next read's buffer (took() is called
    // for that read): the slab stays current, so that the read is handed out from it, but it is
    // dropped, not pooled, when it retires.
    this.keptOut = this.slab;
  }
}
