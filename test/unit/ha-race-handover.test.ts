/**
 * A primary hands its resources over (auto-failback, operator standby, the peer's takeover
 * request, a better peer) only to a peer whose replicated volume is connected to its own: without
 * the link, the peer's "disk UpToDate" is its own metadata's word, stale after a crash.
 */
import { describe, expect, it } from 'vitest';
import { decide, type Facts, type SelfView } from '../../pair-agent/ha/state-machine.ts';

const peerView = (v: Partial<SelfView> = {}): SelfView => ({ state: 'standby', holds: false, disk: 'UpToDate', ping: true, request: 'none', failed: false, ...v });

function primaryB(over: { self?: Partial<Facts['self']>; peer?: Partial<Facts['peer']>; autoFailback?: boolean } = {}): Facts {
  return {
    node: 'b',
    preferred: 'a',
    autoFailback: over.autoFailback ?? false,
    initdeadOver: true,
    peerFenced: false,
    self: { holds: true, disk: 'UpToDate', ping: true, request: 'none', failed: false, maintenance: false, ...over.self },
    peer: { alive: true, everSeen: true, view: peerView(), ...over.peer },
  };
}

describe('hand-over and the replication link', () => {
  it('no hand-over of any kind to a peer whose volume is not connected', () => {
    const cases: Array<Parameters<typeof primaryB>[0]> = [
      { autoFailback: true },
      { self: { request: 'standby' } },
      { peer: { view: peerView({ request: 'takeover' }) } },
      { self: { ping: false } },
      { self: { failed: true } },
    ];
    for (const c of cases) {
      expect(decide('primary', primaryB(c))?.to, JSON.stringify(c)).toBe('releasing');
      expect(decide('primary', primaryB({ ...c, peer: { ...c?.peer, linked: false } })), JSON.stringify(c)).toBeNull();
      expect(decide('primary', primaryB({ ...c, peer: { ...c?.peer, linked: true } }))?.to, JSON.stringify(c)).toBe('releasing');
    }
  });
  it('two holders are still settled whatever the link says', () => {
    const f = primaryB({ peer: { view: peerView({ state: 'primary', holds: true }), linked: false } });
    expect(decide('primary', f)?.to).toBe('releasing');
  });
  it('an election between two standbys waits for the link until initdead is over', () => {
    const standbyA = (linked: boolean | undefined, initdeadOver: boolean): Facts => ({
      ...primaryB(),
      node: 'a',
      initdeadOver,
      self: { holds: false, disk: 'UpToDate', ping: true, request: 'none', failed: false, maintenance: false },
      peer: { alive: true, everSeen: true, view: peerView(), linked },
    });
    expect(decide('standby', standbyA(false, false))).toBeNull();
    expect(decide('standby', standbyA(false, true))?.to).toBe('taking-over');
    expect(decide('standby', standbyA(true, false))?.to).toBe('taking-over');
    expect(decide('standby', standbyA(undefined, false))?.to).toBe('taking-over');
  });
});
