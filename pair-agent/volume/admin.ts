/**
 * The volume's own admin listener: `GET /status`, `/digest`, `/metrics`, `/health` and the
 * operator actions that `pairgate volume …` sends. Opened by `volume serve`, and by a pair-agent
 * whose `volume:` section has an `admin:` block (so the same commands work on a pair's volume).
 */
import { createHash, randomBytes } from 'node:crypto';
import { startAdminServer, type AdminServer } from '../../common/admin-http.ts';
import { BadInputError } from '../../common/errors.ts';
import type { Logger } from '../../common/log.ts';
import type { MetricsRegistry } from '../../common/metrics.ts';
import { BLOCK_SIZE } from './block-device.ts';
import type { ReplicatedVolume } from './replicated-volume.ts';

/** The admin routes of a volume node (also opened by a pair-agent when its volume has `admin:`). */
export function volumeRoutes(volume: ReplicatedVolume) {
  return {
    'GET /status': () => volume.status(),
    'POST /primary': ({ body }: { body: unknown }) => volume.promote({ force: (body as { force?: boolean })?.force === true }),
    'POST /secondary': () => volume.demote(),
    'POST /connect': () => volume.connect(),
    'POST /disconnect': () => volume.disconnect(),
    'POST /verify': () => volume.verify(),
    'POST /outdate': () => volume.outdate(),
    'POST /resume-io': ({ body }: { body: unknown }) => {
      const peer = (body as { peer?: unknown })?.peer;
      if (peer !== 'outdated' && peer !== 'fenced') throw new BadInputError('POST /resume-io needs {"peer": "outdated"|"fenced"}: say how the peer was made safe');
      return volume.peerSettled(peer);
    },
    'POST /resolve': ({ body }: { body: unknown }) => volume.resolve({ discardMyData: (body as { discardMyData?: boolean })?.discardMyData === true }),
    'GET /digest': async () => {
      const blocks = await volume.blockDigests();
      return { blocks: blocks.length, digest: createHash('sha256').update(blocks.join('')).digest('hex'), blockDigests: blocks };
    },
    /** Writes base64 data at an offset through the store's path (primary only); for tests and demos. */
    'POST /write': async ({ body }: { body: unknown }) => {
      const b = body as { offset?: number; data?: string };
      if (typeof b?.offset !== 'number' || typeof b.data !== 'string') throw new BadInputError('POST /write needs {offset, data (base64)}');
      await volume.write(b.offset, Buffer.from(b.data, 'base64'));
      return { ok: true };
    },
    /** Fills `bytes` from `offset` with random 64 KiB writes (primary only). */
    'POST /fill': async ({ body }: { body: unknown }) => {
      const b = body as { offset?: number; bytes?: number };
      const offset = b?.offset ?? 0;
      const bytes = b?.bytes ?? 0;
      if (!Number.isInteger(bytes) || bytes <= 0 || bytes % BLOCK_SIZE !== 0) throw new BadInputError(`fill needs bytes, a positive multiple of ${BLOCK_SIZE}`);
      const started = Date.now();
      for (let done = 0; done < bytes; ) {
        const n = Math.min(64 * 1024, bytes - done);
        await volume.write(offset + done, randomBytes(n));
        done += n;
      }
      return { bytes, ms: Date.now() - started };
    },
  };
}

export function startVolumeAdmin(
  volume: ReplicatedVolume,
  admin: { host: string; port: number; token?: string | undefined },
  deps: { log: Logger; registry: MetricsRegistry },
): Promise<AdminServer> {
  return startAdminServer({
    host: admin.host,
    port: admin.port,
    token: admin.token,
    registry: deps.registry,
    log: deps.log,
    health: () => {
      const s = volume.status();
      return { healthy: s.disk === 'UpToDate' && !s.splitBrain, body: s };
    },
    routes: volumeRoutes(volume),
  });
}
