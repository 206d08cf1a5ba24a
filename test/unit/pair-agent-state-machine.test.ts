/** The pair node state machine: the decisions as a table of facts -> next state. */
import { describe, expect, it } from 'vitest';
import { checkTransition, decide, electWinner, type Facts, type NodeState, type SelfView } from '../../pair-agent/ha/state-machine.ts';

const peerView = (v: Partial<SelfView> = {}): SelfView => ({ state: 'standby', holds: false, disk: 'UpToDate', ping: true, request: 'none', failed: false, ...v });

function facts(over: Partial<Omit<Facts, 'self' | 'peer'>> & { self?: Partial<Facts['self']>; peer?: Partial<Facts['peer']> } = {}): Facts {
  const { self, peer, ...rest } = over;
  return {
    node: 'b',
    preferred: 'a',
    autoFailback: false,
    initdeadOver: true,
    peerFenced: false,
    ...rest,
    self: { holds: false, disk: 'UpToDate', ping: true, request: 'none', failed: false, maintenance: false, ...self },
    peer: { alive: true, everSeen: true, view: peerView(), ...peer },
  };
}

describe('start and election', () => {
  it('waits initdead for the peer, then goes standby', () => {
    expect(decide('starting', facts({ initdeadOver: false, peer: { alive: false, everSeen: false, view: null } }))).toBeNull();
    expect(decide('starting', facts({ initdeadOver: true, peer: { alive: false, everSeen: false, view: null } }))?.to).toBe('standby');
    expect(decide('starting', facts({ initdeadOver: false }))?.to).toBe('standby');
  });
  it('stays standby while the peer holds the resources', () => {
    expect(decide('standby', facts({ node: 'a', peer: { view: peerView({ state: 'primary', holds: true }) } }))).toBeNull();
    expect(decide('standby', facts({ node: 'a', peer: { view: peerView({ state: 'releasing', holds: true }) } }))).toBeNull();
  });
  it('the preferred node takes the resources when neither holds them', () => {
    expect(decide('standby', facts({ node: 'a' }))).toMatchObject({ to: 'taking-over', kind: 'soft' });
    expect(decide('standby', facts({ node: 'b' }))).toBeNull();
  });
  it('a node whose data is not UpToDate never takes over while the peer is', () => {
    expect(decide('standby', facts({ node: 'a', self: { disk: 'Outdated' } }))).toBeNull();
    expect(decide('standby', facts({ node: 'b', peer: { view: peerView({ disk: 'Outdated' }) } }))?.to).toBe('taking-over');
    // nor when the peer is dead: stale data is never promoted on its own
    expect(decide('standby', facts({ node: 'b', self: { disk: 'Outdated' }, peer: { alive: false } }))).toBeNull();
  });
  it('elects the same winner on both nodes', () => {
    const a = { disk: 'UpToDate', ping: false, failed: false, request: 'none' as const };
    const b = { disk: 'UpToDate', ping: true, failed: false, request: 'none' as const };
    expect(electWinner('a', a, b, 'a').winner).toBe('b');
    expect(electWinner('b', b, a, 'a').winner).toBe('b');
    expect(electWinner('a', { ...a, ping: true }, b, null).winner).toBe('a');
    expect(electWinner('b', b, { ...a, ping: true }, null).winner).toBe('a');
  });
});

describe('peer death and fencing', () => {
  it('peer dead: fence first, take over only after the fence is confirmed', () => {
    const dead = facts({ peer: { alive: false, view: peerView({ state: 'primary', holds: true }) } });
    expect(decide('standby', dead)).toMatchObject({ to: 'fencing', kind: 'hard' });
    expect(decide('fencing', dead)).toBeNull();
    expect(decide('fencing', { ...dead, peerFenced: true })).toMatchObject({ to: 'taking-over' });
  });
  it('an unclean peer (a resource did not stop there) is fenced as a dead one, though it still sends heartbeats, before anyone takes over', () => {
    // The agent reports such a peer as not alive and unclean (agent.ts: peerFacts).
    const unclean = facts({ peer: { alive: false, unclean: true, view: peerView({ state: 'releasing', holds: true, unclean: true }) } });
    expect(decide('standby', unclean)).toMatchObject({ to: 'fencing', kind: 'hard', reason: 'peer unclean: a resource did not stop there' });
    expect(decide('fencing', unclean)).toBeNull();
    expect(decide('fencing', { ...unclean, peerFenced: true })).toMatchObject({ to: 'taking-over', reason: 'peer fenced' });
    // Its stop went through after all (clean, standby): the fence is called off.
    expect(decide('fencing', facts({ peer: { view: peerView({ state: 'standby' }) } }))).toMatchObject({ to: 'standby', reason: 'peer is alive again' });
  });
  it('a peer that comes back during fencing ends the fencing', () => {
    expect(decide('fencing', facts())).toMatchObject({ to: 'standby' });
  });
  it('never seen within initdead: fence before taking the resources', () => {
    expect(decide('standby', facts({ peer: { alive: false, everSeen: false, view: null } }))?.to).toBe('fencing');
  });
  it('a node whose resources just failed to start does not retry until the agent clears it', () => {
    const dead = facts({ self: { failed: true }, peer: { alive: false } });
    expect(decide('standby', dead)).toBeNull();
    expect(decide('fencing', { ...dead, peerFenced: true })).toBeNull();
  });
  it('a primary keeps the resources when the standby dies', () => {
    expect(decide('primary', facts({ self: { holds: true }, peer: { alive: false } }))).toBeNull();
  });
});

describe('hand-over', () => {
  const primary = (over: Parameters<typeof facts>[0] = {}) => facts({ node: 'a', ...over, self: { holds: true, ...over.self } });
  it('ipfail: the primary that reaches no ping target hands over to a peer that does', () => {
    expect(decide('primary', primary({ self: { ping: false } }))).toMatchObject({ to: 'releasing', kind: 'soft' });
    expect(decide('primary', primary({ self: { ping: false }, peer: { view: peerView({ ping: false }) } }))).toBeNull();
    expect(decide('primary', primary({ self: { ping: false }, peer: { alive: false } }))).toBeNull();
  });
  it('operator standby and takeover', () => {
    expect(decide('primary', primary({ self: { request: 'standby' } }))?.reason).toBe('operator standby');
    expect(decide('primary', primary({ peer: { view: peerView({ request: 'takeover' }) } }))?.to).toBe('releasing');
    // after the hand-over the requesting node wins the election even against the preferred node
    expect(decide('standby', facts({ node: 'b', self: { request: 'takeover' } }))?.to).toBe('taking-over');
    expect(decide('standby', facts({ node: 'a', peer: { view: peerView({ request: 'takeover' }) } }))).toBeNull();
  });
  it('auto-failback only when enabled, and only to the preferred node', () => {
    const onB = facts({ node: 'b', self: { holds: true } });
    expect(decide('primary', onB)).toBeNull();
    expect(decide('primary', { ...onB, autoFailback: true })?.reason).toBe('auto-failback to the preferred node');
    expect(decide('primary', { ...primary(), autoFailback: true })).toBeNull();
  });
  it('resources failed past the threshold move to a healthy peer', () => {
    expect(decide('primary', primary({ self: { failed: true } }))?.to).toBe('releasing');
  });
  it('two holders: the node that loses the election releases', () => {
    const both = (node: 'a' | 'b') => facts({ node, self: { holds: true }, peer: { view: peerView({ state: 'primary', holds: true }) } });
    expect(decide('primary', both('b'))?.to).toBe('releasing');
    expect(decide('primary', both('a'))).toBeNull();
  });
});

describe('maintenance and transitions', () => {
  it('maintenance on from any running state, off back to what the node holds', () => {
    for (const s of ['standby', 'primary', 'fencing'] as NodeState[]) expect(decide(s, facts({ self: { maintenance: true } }))?.to).toBe('maintenance');
    expect(decide('maintenance', facts({ self: { maintenance: true } }))).toBeNull();
    expect(decide('maintenance', facts({ self: { holds: true } }))?.to).toBe('primary');
    expect(decide('maintenance', facts())?.to).toBe('standby');
  });
  it('refuses transitions outside the table with a reason', () => {
    expect(checkTransition('standby', 'primary')).toEqual({ ok: false, reason: 'no transition standby -> primary' });
    expect(checkTransition('fencing', 'taking-over').ok).toBe(true);
    expect(checkTransition('stopped', 'standby').ok).toBe(false);
  });
});
