/**
 * persistMeta skips a metadata file identical to the bytes it last wrote (634b967). That copy must
 * describe the file on disk: a write that fails after its rename (the folder's fsync) has replaced
 * the file, so the copy is no longer the file's, and a later return to those same bytes must be
 * written, not skipped.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it, vi } from 'vitest';

/** When set, the next fsync of a folder fails with EIO (as a failing disk's would). */
const failFolderFsync = { armed: false };
vi.mock('node:fs', async (importOriginal) => {
  const fs = await importOriginal<typeof import('node:fs')>();
  return {
    ...fs,
    fsyncSync: (fd: number) => {
      if (failFolderFsync.armed && fs.fstatSync(fd).isDirectory()) {
        failFolderFsync.armed = false;
        throw Object.assign(new Error('EIO: i/o error, fsync'), { code: 'EIO' });
      }
      return fs.fsyncSync(fd);
    },
  };
});

const { readMetadata } = await import('../../pair-agent/volume/metadata.ts');
const { volumeConfigSchema } = await import('../../pair-agent/volume/config.ts');
const { ReplicatedVolume } = await import('../../pair-agent/volume/replicated-volume.ts');
const { silentLogger } = await import('../../common/log.ts');
const { createRegistry } = await import('../../common/metrics.ts');

const dir = mkdtempSync(join(tmpdir(), 'pairgate-meta-cache-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('the metadata a volume last wrote', () => {
  it('is forgotten when a write fails after its rename: going back to those bytes writes them again', async () => {
    const config = volumeConfigSchema.parse({
      name: 'v', dataFile: join(dir, 'v.data'), metaFile: join(dir, 'v.meta'), sizeBytes: 1024 * 1024,
      listen: '127.0.0.1:0', peer: '127.0.0.1:9', secret: 'meta-cache-secret-0123',
    });
    const v = await ReplicatedVolume.open(config, { log: silentLogger, registry: createRegistry({}, false) });
    // The private state this is about: the metadata in memory and its persisting.
    const inner = v as unknown as { meta: { disk: string; flags: { peerWasOutdated: boolean } }; persistMeta(): void };
    try {
      inner.persistMeta(); // A: written and remembered
      expect(readMetadata(config.metaFile)!.flags.peerWasOutdated).toBe(false);

      inner.meta.flags.peerWasOutdated = true; // B: renamed into place, then the folder's fsync fails
      failFolderFsync.armed = true;
      inner.persistMeta();
      expect(v.status().disk).toBe('Failed');
      expect(readMetadata(config.metaFile)!.flags.peerWasOutdated).toBe(true);

      // Back to A's every field (as a later state change can come back to them): the file holds B, so A is written.
      inner.meta.flags.peerWasOutdated = false;
      inner.meta.disk = 'Inconsistent';
      inner.persistMeta();
      expect(readMetadata(config.metaFile)).toMatchObject({ disk: 'Inconsistent', flags: { peerWasOutdated: false } });
    } finally {
      await v.close();
    }
  });
});
