/**
 * The `volume:` section of a pair-agent config (and of `pairgate volume serve`). Both nodes
 * of a pair name the same volume, the same size and the same secret; each names its own files,
 * its own `listen` address and the peer's.
 *
 *   volume:
 *     name: pair-07-mail
 *     dataFile: /var/lib/pairgate/pair-07.data
 *     metaFile: /var/lib/pairgate/pair-07.meta
 *     sizeBytes: 107374182400
 *     listen: 10.0.7.11:7789
 *     peer: 10.0.7.12:7789
 *     secret: ${PAIRGATE_REPLICATION_SECRET}
 *     protocol: C
 */
import { durationMs, hostPort, z } from '../../common/config.ts';
import { BLOCK_SIZE } from './block-device.ts';

export const volumeConfigSchema = z
  .object({
    /** The volume's name; both nodes must agree (checked at the handshake). */
    name: z.string().regex(/^[A-Za-z0-9_.-]{1,64}$/, 'volume name: letters, digits, . _ -'),
    dataFile: z.string().min(1),
    metaFile: z.string().min(1),
    sizeBytes: z.number().int().positive().multipleOf(BLOCK_SIZE, `a multiple of ${BLOCK_SIZE}`),
    /** This node's replication address (host:port); both nodes listen, the lower address connects. */
    listen: hostPort,
    peer: hostPort,
    /** Shared secret for the HMAC handshake (at least 16 characters; from the environment). */
    secret: z.string().min(16, 'the replication secret needs at least 16 characters'),
    /** A: written locally and sent; B: the peer received it; C: both disks have it (default). */
    protocol: z.enum(['A', 'B', 'C']).default('C'),
    resyncRateBytesPerSec: z.number().int().positive().default(100 * 1024 * 1024),
    /**
     * The largest piece of a write one DATA frame carries (64 KiB to 1 MiB, whole blocks). A larger
     * write leaves as several frames sent together; the peer checks and writes each as it arrives
     * while the next is on the way, then flushes once. Smaller pieces pay when the peer's disk is its
     * own; on one shared disk (both nodes on one machine) the extra writes cost more than they save.
     */
    dataFrameBytes: z.number().int().min(64 * 1024).max(1024 * 1024).multipleOf(BLOCK_SIZE, `a multiple of ${BLOCK_SIZE}`).default(1024 * 1024),
    /**
     * DRBD's `fencing`. `dont-care`: a primary that loses its link goes on writing alone at once.
     * `resource-and-stonith`: it holds every write (and the acknowledgement of writes the peer had
     * not confirmed) until it knows the peer cannot be promoted with the old data: the peer's disk
     * marked Outdated (`outdate()`, asked over the pair agent's heartbeat), the peer fenced, or the
     * link back; the pair agent does this and makes it the default under it (`peerSettled()`).
     */
    fencing: z.enum(['dont-care', 'resource-and-stonith']).default('dont-care'),
    afterSb0Pri: z.enum(['disconnect', 'discard-zero-changes', 'discard-younger-primary', 'discard-least-changes']).default('disconnect'),
    afterSb1Pri: z.enum(['disconnect', 'consensus', 'discard-secondary']).default('disconnect'),
    pingIntervalMs: durationMs.min(10).default(200),
    /** Silence on the link for this long and the peer is gone (well under a second by default). */
    pingTimeoutMs: durationMs.min(50).default(800),
    connectTimeoutMs: durationMs.min(50).default(1000),
    reconnectMs: durationMs.min(10).default(250),
    /** Optional admin listener of the volume itself (`pairgate volume …` commands talk to it). */
    admin: z
      .object({ host: z.string().default('127.0.0.1'), port: z.number().int().min(0).max(65535), token: z.string().optional() })
      .strict()
      .optional(),
  })
  .strict()
  .superRefine((c, ctx) => {
    if (c.listen === c.peer) ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['peer'], message: 'peer must differ from listen' });
    if (c.pingTimeoutMs <= c.pingIntervalMs) ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['pingTimeoutMs'], message: 'must be longer than pingIntervalMs' });
  });

export type VolumeConfig = z.output<typeof volumeConfigSchema>;
