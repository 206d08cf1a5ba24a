/**
 * The lab's port plan: internal ports come from the instance's own block, outside the kernel's
 * ephemeral range, skipping ports something already listens on.
 */
import net from 'node:net';
import { readFileSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { LAB_PORT_BASE, LAB_PORT_BLOCK, LabPortBlock, MAX_INSTANCE } from '../../bin/lab/plan.ts';

const held: net.Server[] = [];
afterEach(async () => {
  await Promise.all(held.splice(0).map((s) => new Promise((r) => s.close(r))));
});

function hold(port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(port, '127.0.0.1', () => {
      held.push(s);
      resolve();
    });
  });
}

describe('lab port block', () => {
  it('lies below the ephemeral range for every instance', () => {
    const [low] = readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/).map(Number);
    expect(LAB_PORT_BASE + (MAX_INSTANCE + 1) * LAB_PORT_BLOCK).toBeLessThanOrEqual(low!);
  });

  it('hands out its ports in order, steps over a busy one, and says so when the block is used up', async () => {
    // The last instance's block: no other test in this suite plans a lab there.
    const start = LAB_PORT_BASE + MAX_INSTANCE * LAB_PORT_BLOCK;
    await hold(start + 1);
    const block = new LabPortBlock(MAX_INSTANCE);
    const ports: number[] = [];
    for (let i = 0; i < LAB_PORT_BLOCK - 1; i++) ports.push(await block.next());
    expect(ports[0]).toBe(start);
    expect(ports[1]).toBe(start + 2);
    expect(new Set(ports).size).toBe(LAB_PORT_BLOCK - 1);
    await expect(block.next()).rejects.toThrow(/no free port left in 127\.0\.0\.1:13500-13549.*--instance N/);
  });
});
