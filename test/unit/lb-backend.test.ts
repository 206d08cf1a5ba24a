/** A backend's health state machine (fall/rise), slow start, admin states and maxconn. */
import { describe, expect, it } from 'vitest';
import { Backend } from '../../loadbalancer/backend.ts';
import { poolSchema } from '../../loadbalancer/config.ts';
import { lbMetrics } from '../../loadbalancer/metrics.ts';
import { createRegistry } from '../../common/metrics.ts';
import { silentLogger } from '../../common/log.ts';

function make(pool: Record<string, unknown> = {}, backend: Record<string, unknown> = {}) {
  const cfg = poolSchema.parse({ check: { fall: 3, rise: 2 }, ...pool, backends: [{ name: 'p1', address: '127.0.0.1:1', ...backend }] });
  const registry = createRegistry({}, false);
  const b = new Backend('imap', cfg.backends[0]!, cfg, lbMetrics(registry), silentLogger);
  return { b, registry };
}

describe('Backend', () => {
  it('goes down after `fall` consecutive failures and up after `rise` successes; a success resets the count', async () => {
    const { b, registry } = make();
    b.observe('fail');
    b.observe('timeout');
    b.observe('ok');
    b.observe('fail');
    b.observe('fail');
    expect(b.up).toBe(true);
    b.observe('fail');
    expect(b.up).toBe(false);
    expect(b.eligible()).toBe(false);
    expect(await registry.metrics()).toMatch(/pairgate_lb_backend_up\{backend="imap\/p1"\} 0/);
    b.observe('ok');
    expect(b.up).toBe(false);
    b.observe('ok');
    expect(b.up).toBe(true);
    expect(await registry.metrics()).toMatch(/pairgate_lb_backend_up\{backend="imap\/p1"\} 1/);
  });

  it('slow start ramps the weight after coming back up', () => {
    const { b } = make({ slowStartMs: 1000, check: { fall: 1, rise: 1 } }, { weight: 4 });
    expect(b.effectiveWeight(Date.now())).toBe(4);
    b.observe('fail');
    b.observe('ok');
    const now = Date.now();
    expect(b.effectiveWeight(now)).toBeLessThan(0.5);
    expect(b.effectiveWeight(now + 500)).toBeCloseTo(2, 0);
    expect(b.effectiveWeight(now + 1500)).toBe(4);
  });

  it('drain and maintenance take it out of rotation, maxconn caps it, weight 0 takes nothing', () => {
    const { b } = make({}, { maxconn: 2 });
    b.setAdmin('drain');
    expect(b.eligible()).toBe(false);
    b.setAdmin('maintenance');
    expect(b.status().state).toBe('maintenance');
    b.setAdmin('ready');
    expect(b.eligible()).toBe(true);
    b.acquire();
    b.acquire();
    expect(b.eligible()).toBe(false);
    expect(b.serviceable()).toBe(true);
    let freed = 0;
    b.onCapacity = () => freed++;
    b.release();
    expect(freed).toBe(1);
    expect(b.eligible()).toBe(true);
    b.setWeight(0);
    expect(b.eligible()).toBe(false);
  });
});
