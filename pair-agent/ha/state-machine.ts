/**
 * The node state machine of a pair, as a pure module: given the current state and the facts the
 * agent knows (its own view, the peer's last heartbeat view, timers, fencing), `decide` proposes
 * the next state with a named reason, and `checkTransition` refuses transitions the table does not
 * allow. The agent (agent.ts) commits a proposal and only then runs its side effects (fence, start
 * or stop resources), rechecking the state after every await, in the manner of drbd_state.c.
 *
 * Soft transitions are voluntary (an election, an operator request, auto-failback) and only
 * happen with a live peer that agrees it does not hold the resources; hard ones are imposed
 * (peer dead, two holders, maintenance).
 */
export const NODE_STATES = ['starting', 'standby', 'taking-over', 'fencing', 'primary', 'releasing', 'stopped', 'maintenance'] as const;
export type NodeState = (typeof NODE_STATES)[number];
export type NodeId = 'a' | 'b';
export type OperatorRequest = 'none' | 'standby' | 'takeover';

/** What a node says about itself (sent in every heartbeat; see heartbeat-codec.ts). */
export interface SelfView {
  state: NodeState;
  holds: boolean;
  disk: string;
  ping: boolean;
  request: OperatorRequest;
  failed: boolean;
  /** A resource did not stop on this node (see heartbeat-codec.ts); absent means false. */
  unclean?: true;
}

export interface Facts {
  node: NodeId;
  /** The node that takes the resources when both could; null = none preferred (then `a` breaks ties). */
  preferred: NodeId | null;
  autoFailback: boolean;
  /** initdead has passed since this node started. */
  initdeadOver: boolean;
  self: Omit<SelfView, 'state'> & { maintenance: boolean };
  peer: {
    /** Heard within deadtime, and not unclean (an unclean peer is fenced as a dead one is). */
    alive: boolean;
    /** Heard within deadtime saying a resource did not stop there: it must be fenced before anyone takes over. */
    unclean?: boolean;
    /** Heard at least once since this node started. */
    everSeen: boolean;
    /** The peer's last view (null when never heard). */
    view: SelfView | null;
    /**
     * false: a replicated volume whose link to the peer's is not connected, so the peer's disk
     * state is only the peer's own word (its metadata), stale when this node wrote alone
     * meanwhile. true (or absent): connected, or no replicated volume.
     */
    linked?: boolean;
  };
  /** The peer's death in the current episode has been confirmed by a successful fence. */
  peerFenced: boolean;
}

export type TransitionKind = 'soft' | 'hard';

export interface Decision {
  to: NodeState;
  reason: string;
  kind: TransitionKind;
}

/** Disk states a node may serve from: an UpToDate replica, or no replicated volume at all. */
export function diskUsable(disk: string): boolean {
  return disk === 'UpToDate' || disk === 'none';
}

export function other(node: NodeId): NodeId {
  return node === 'a' ? 'b' : 'a';
}

interface Candidate {
  disk: string;
  ping: boolean;
  failed: boolean;
  request: OperatorRequest;
}

/** Fitness to hold the resources: data first (never a stale disk over an UpToDate one), then working resources, then ping. */
export function fitness(c: Candidate): number {
  return (diskUsable(c.disk) ? 4 : 0) + (c.failed ? 0 : 2) + (c.ping ? 1 : 0);
}

/** Which node should hold the resources when both are up and neither holds them. Same answer on both nodes given the same views. */
export function electWinner(node: NodeId, self: Candidate, peer: Candidate, preferred: NodeId | null): { winner: NodeId; reason: string } {
  const me = fitness(self);
  const them = fitness(peer);
  const p = other(node);
  if (me !== them) {
    const winner = me > them ? node : p;
    const loser = me > them ? peer : self;
    const why = !diskUsable(loser.disk) ? 'disk not UpToDate on the other node' : loser.failed ? 'resources failed on the other node' : 'the other node reaches no ping target';
    return { winner, reason: why };
  }
  if (self.request === 'takeover' && peer.request !== 'takeover') return { winner: node, reason: 'operator takeover' };
  if (peer.request === 'takeover' && self.request !== 'takeover') return { winner: p, reason: 'operator takeover on the peer' };
  if (self.request === 'standby' && peer.request !== 'standby') return { winner: p, reason: 'operator standby' };
  if (peer.request === 'standby' && self.request !== 'standby') return { winner: node, reason: 'operator standby on the peer' };
  const w = preferred ?? 'a';
  return { winner: w, reason: preferred ? 'preferred node' : 'no preferred node: a breaks the tie' };
}

/** handOverReason's answer for a hand-over on this node's operator standby. */
export const STANDBY_HAND_OVER = 'operator standby';

/** Why a primary should hand its resources to a live standby peer, or null to keep them. */
export function handOverReason(f: Facts): string | null {
  const peer = f.peer.view;
  if (!peer) return null;
  // Never to a peer whose volume has not met this one's: a node back from a crash says UpToDate
  // (its metadata) before its volume has connected and learnt that it is behind; given the
  // resources, it would promote its old data alone (the writes made here meanwhile missing there,
  // the two volumes in split brain once connected). The hand-over waits for the link.
  if (f.peer.linked === false) return null;
  if (!diskUsable(peer.disk) && diskUsable(f.self.disk)) return null;
  // Not to a peer whose start just failed (it would lose the election at once and this node take
  // the resources back): the standby waits for the peer's backoff to end.
  if (f.self.request === 'standby' && !peer.failed) return STANDBY_HAND_OVER;
  if (peer.request === 'takeover' && f.self.request !== 'takeover') return 'operator takeover on the peer';
  const me = fitness(f.self);
  const them = fitness(peer);
  if (them > me) {
    if (!diskUsable(f.self.disk)) return 'local disk not UpToDate, the peer is';
    if (f.self.failed) return 'resources failed here past the threshold';
    return 'no ping target reachable here, the peer reaches one';
  }
  if (f.autoFailback && f.preferred === other(f.node) && them >= me && f.self.request !== 'takeover' && peer.request !== 'standby') {
    return 'auto-failback to the preferred node';
  }
  return null;
}

function peerHolds(f: Facts): boolean {
  const v = f.peer.view;
  return f.peer.alive && v !== null && (v.holds || v.state === 'taking-over' || v.state === 'primary' || v.state === 'releasing');
}

/** The next state from `state` given `f`, or null to stay. In-progress states (taking-over, releasing) end by the agent. */
export function decide(state: NodeState, f: Facts): Decision | null {
  if (state === 'stopped') return null;
  if (f.self.maintenance) return state === 'maintenance' ? null : { to: 'maintenance', reason: 'operator maintenance on', kind: 'hard' };
  if (state === 'maintenance') {
    return { to: f.self.holds ? 'primary' : 'standby', reason: 'operator maintenance off', kind: 'hard' };
  }
  const peer = f.peer.view;
  switch (state) {
    case 'starting':
      if (f.peer.alive) return { to: 'standby', reason: peerHolds(f) ? 'peer holds the resources' : 'peer is up', kind: 'soft' };
      if (f.initdeadOver) return { to: 'standby', reason: 'initdead passed without the peer', kind: 'hard' };
      return null;

    case 'standby': {
      if (f.peer.alive && peer) {
        if (peerHolds(f) || peer.state === 'fencing') return null;
        // Replicated volumes not yet connected: each disk state is its own metadata's word, and
        // after both nodes restart, both say UpToDate though only one may have the newer data (the
        // other would promote its old data alone: split brain). The link's handshake tells (the
        // older side turns sync target): the election waits for it, until initdead is over.
        if (f.peer.linked === false && !f.initdeadOver) return null;
        const { winner, reason } = electWinner(f.node, f.self, peer, f.preferred);
        if (winner !== f.node) return null;
        if (!diskUsable(f.self.disk)) return null;
        return { to: 'taking-over', reason: `elected: ${reason}`, kind: 'soft' };
      }
      if (!f.peer.alive && (f.peer.everSeen || f.initdeadOver)) {
        if (!diskUsable(f.self.disk)) return null; // never promote stale data; the operator decides
        if (f.self.failed) return null; // a start just failed here: the agent clears this after a backoff
        if (f.peerFenced) return { to: 'taking-over', reason: 'peer fenced', kind: 'hard' };
        const why = f.peer.unclean ? 'peer unclean: a resource did not stop there' : f.peer.everSeen ? 'peer dead' : 'peer not seen within initdead';
        return { to: 'fencing', reason: why, kind: 'hard' };
      }
      return null;
    }

    case 'fencing':
      if (f.peer.alive) return { to: 'standby', reason: 'peer is alive again', kind: 'hard' };
      if (f.peerFenced) {
        if (!diskUsable(f.self.disk)) return { to: 'standby', reason: 'peer fenced but local data not UpToDate', kind: 'hard' };
        if (f.self.failed) return null;
        return { to: 'taking-over', reason: 'peer fenced', kind: 'hard' };
      }
      return null;

    case 'taking-over':
    case 'primary': {
      if (f.peer.alive && peer && (peer.state === 'primary' || peer.state === 'taking-over')) {
        const { winner } = electWinner(f.node, f.self, peer, f.preferred);
        if (winner !== f.node) return { to: 'releasing', reason: 'both nodes hold the resources: the elected peer keeps them', kind: 'hard' };
        return null;
      }
      if (state === 'primary' && f.peer.alive && peer && peer.state === 'standby' && !peer.holds) {
        const why = handOverReason(f);
        if (why) return { to: 'releasing', reason: why, kind: 'soft' };
      }
      return null;
    }

    case 'releasing':
      return null;
  }
}

/** The transitions the agent may commit; anything else is refused with a named reason. */
const ALLOWED: Record<NodeState, readonly NodeState[]> = {
  starting: ['standby', 'maintenance', 'stopped'],
  standby: ['fencing', 'taking-over', 'maintenance', 'stopped'],
  fencing: ['taking-over', 'standby', 'maintenance', 'stopped'],
  'taking-over': ['primary', 'releasing', 'maintenance', 'stopped'],
  primary: ['releasing', 'maintenance', 'stopped'],
  releasing: ['standby', 'maintenance', 'stopped'],
  maintenance: ['standby', 'primary', 'stopped'],
  stopped: [],
};

export function checkTransition(from: NodeState, to: NodeState): { ok: true } | { ok: false; reason: string } {
  if (from === to) return { ok: false, reason: `already ${to}` };
  if (!ALLOWED[from].includes(to)) return { ok: false, reason: `no transition ${from} -> ${to}` };
  return { ok: true };
}

/** The role a node's resources have in each state (what /health shows as the node's role). */
export function roleOf(state: NodeState, holds: boolean): 'primary' | 'secondary' | 'unknown' {
  if (state === 'primary' || state === 'taking-over' || state === 'releasing') return 'primary';
  if (state === 'maintenance') return holds ? 'primary' : 'secondary';
  if (state === 'stopped') return 'unknown';
  return 'secondary';
}
