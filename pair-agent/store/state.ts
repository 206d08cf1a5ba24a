/**
 * The store's in-memory indexes and the operations that change them. Every change is an `Op`
 * written to the log; `applyOp` is the only code that mutates the indexes, used both live
 * (right after the op is appended) and on replay, so the two can never disagree.
 */
import type { Flag, SpecialUse } from './types.ts';

export interface Msg {
  uid: number;
  body: string;
  size: number;
  date: number;
  flags: Flag[];
  modseq: number;
}

export interface Mailbox {
  name: string;
  uidValidity: number;
  uidNext: number;
  highestModseq: number;
  specialUse?: SpecialUse | undefined;
  msgs: Map<number, Msg>;
}

export interface User {
  name: string;
  mailboxes: Map<string, Mailbox>;
  subscriptions: Set<string>;
  usedBytes: number;
}

export interface BodyChunk {
  /** Offset of the BODY record on the volume. */
  offset: number;
  /** Header plus payload. */
  length: number;
}

export interface Body {
  size: number;
  refs: number;
  chunks: BodyChunk[];
  meta?: Record<string, string>;
}

export interface DeliveryRecord {
  at: number;
  /** user -> uid in that user's INBOX. */
  users: Record<string, number>;
}

export type Op =
  | { op: 'mbox'; user: string; name: string; uv: number; special?: SpecialUse; sub?: boolean }
  | { op: 'mdel'; user: string; name: string }
  | { op: 'mren'; user: string; from: string; to: string }
  | { op: 'sub'; user: string; name: string; v: boolean }
  | { op: 'add'; user: string; mbox: string; uid: number; body: string; size: number; date: number; flags: Flag[]; modseq: number }
  | { op: 'dlv'; id: string; body: string; size: number; date: number; to: Array<[string, number, number]>; at?: number }
  | { op: 'flags'; user: string; mbox: string; ch: Array<[number, Flag[], number]> }
  | { op: 'exp'; user: string; mbox: string; uids: number[]; modseq: number }
  | { op: 'copy'; user: string; from: string; to: string; map: Array<[number, number, number]> }
  | { op: 'meta'; body: string; kind: string; value: string };

export const DELIVERY_MEMORY = 200_000;
export const DELIVERY_KEEP_MS = 7 * 24 * 3600_000;

export class StoreState {
  users = new Map<string, User>();
  bodies = new Map<string, Body>();
  deliveries = new Map<string, DeliveryRecord>();
  /** Next UIDVALIDITY handed out (global, so never reused for any mailbox). */
  nextUidValidity = Math.floor(Date.now() / 1000);
  /** Called when a body's last reference goes, with its chunks (space to reclaim). */
  onBodyDead: (id: string, body: Body) => void = () => undefined;
  /** Problems met while applying (replay of an inconsistent log). */
  problems: string[] = [];

  user(name: string): User | undefined {
    return this.users.get(name);
  }

  private userOrCreate(name: string): User {
    let u = this.users.get(name);
    if (!u) {
      u = { name, mailboxes: new Map(), subscriptions: new Set(), usedBytes: 0 };
      this.users.set(name, u);
    }
    return u;
  }

  private ref(id: string, n: number): void {
    const b = this.bodies.get(id);
    if (!b) {
      this.problems.push(`reference to unknown body ${id}`);
      return;
    }
    b.refs += n;
    if (b.refs <= 0) {
      this.bodies.delete(id);
      this.onBodyDead(id, b);
    }
  }

  private addMsg(u: User, mb: Mailbox, m: Msg): void {
    mb.msgs.set(m.uid, m);
    if (m.uid >= mb.uidNext) mb.uidNext = m.uid + 1;
    if (m.modseq > mb.highestModseq) mb.highestModseq = m.modseq;
    u.usedBytes += m.size;
    this.ref(m.body, 1);
  }

  private removeMsg(u: User, mb: Mailbox, uid: number): boolean {
    const m = mb.msgs.get(uid);
    if (!m) return false;
    mb.msgs.delete(uid);
    u.usedBytes -= m.size;
    this.ref(m.body, -1);
    return true;
  }

  /** Records a body chunk seen in the log (new body, or a body moved by compaction). */
  bodyChunk(id: string, index: number, count: number, size: number, chunk: BodyChunk): { moved?: BodyChunk } {
    let b = this.bodies.get(id);
    if (!b) {
      b = { size, refs: 0, chunks: new Array(count) };
      this.bodies.set(id, b);
    }
    if (b.chunks.length !== count) b.chunks.length = count;
    const old = b.chunks[index];
    b.chunks[index] = chunk;
    return old ? { moved: old } : {};
  }

  /** Drops bodies no message links (a crash between a body and its op). */
  dropUnreferenced(): string[] {
    const dropped: string[] = [];
    for (const [id, b] of this.bodies) {
      if (b.refs <= 0) {
        this.bodies.delete(id);
        this.onBodyDead(id, b);
        dropped.push(id);
      }
    }
    return dropped;
  }

  apply(op: Op): void {
    switch (op.op) {
      case 'mbox': {
        const u = this.userOrCreate(op.user);
        if (u.mailboxes.has(op.name)) return void this.problems.push(`mailbox ${op.user}/${op.name} created twice`);
        u.mailboxes.set(op.name, { name: op.name, uidValidity: op.uv, uidNext: 1, highestModseq: 1, specialUse: op.special, msgs: new Map() });
        if (op.sub) u.subscriptions.add(op.name);
        if (op.uv >= this.nextUidValidity) this.nextUidValidity = op.uv + 1;
        return;
      }
      case 'mdel': {
        const u = this.users.get(op.user);
        const mb = u?.mailboxes.get(op.name);
        if (!u || !mb) return void this.problems.push(`delete of missing mailbox ${op.user}/${op.name}`);
        for (const uid of [...mb.msgs.keys()]) this.removeMsg(u, mb, uid);
        u.mailboxes.delete(op.name);
        u.subscriptions.delete(op.name);
        return;
      }
      case 'mren': {
        const u = this.users.get(op.user);
        const mb = u?.mailboxes.get(op.from);
        if (!u || !mb || u.mailboxes.has(op.to)) return void this.problems.push(`bad rename ${op.user}/${op.from} -> ${op.to}`);
        u.mailboxes.delete(op.from);
        mb.name = op.to;
        u.mailboxes.set(op.to, mb);
        if (u.subscriptions.delete(op.from)) u.subscriptions.add(op.to);
        return;
      }
      case 'sub': {
        const u = this.userOrCreate(op.user);
        if (op.v) u.subscriptions.add(op.name);
        else u.subscriptions.delete(op.name);
        return;
      }
      case 'add': {
        const u = this.users.get(op.user);
        const mb = u?.mailboxes.get(op.mbox);
        if (!u || !mb) return void this.problems.push(`append to missing mailbox ${op.user}/${op.mbox}`);
        this.addMsg(u, mb, { uid: op.uid, body: op.body, size: op.size, date: op.date, flags: op.flags, modseq: op.modseq });
        return;
      }
      case 'dlv': {
        const rec: DeliveryRecord = this.deliveries.get(op.id) ?? { at: op.at ?? op.date, users: {} };
        for (const [user, uid, modseq] of op.to) {
          const u = this.users.get(user);
          const mb = u?.mailboxes.get('INBOX');
          if (!u || !mb) {
            this.problems.push(`delivery to missing INBOX of ${user}`);
            continue;
          }
          this.addMsg(u, mb, { uid, body: op.body, size: op.size, date: op.date, flags: [], modseq });
          rec.users[user] = uid;
        }
        this.deliveries.delete(op.id);
        this.deliveries.set(op.id, rec);
        if (this.deliveries.size > DELIVERY_MEMORY) {
          const first = this.deliveries.keys().next().value;
          if (first !== undefined) this.deliveries.delete(first);
        }
        return;
      }
      case 'flags': {
        const mb = this.users.get(op.user)?.mailboxes.get(op.mbox);
        if (!mb) return void this.problems.push(`flags in missing mailbox ${op.user}/${op.mbox}`);
        for (const [uid, flags, modseq] of op.ch) {
          const m = mb.msgs.get(uid);
          if (!m) continue;
          m.flags = flags;
          m.modseq = modseq;
          if (modseq > mb.highestModseq) mb.highestModseq = modseq;
        }
        return;
      }
      case 'exp': {
        const u = this.users.get(op.user);
        const mb = u?.mailboxes.get(op.mbox);
        if (!u || !mb) return void this.problems.push(`expunge in missing mailbox ${op.user}/${op.mbox}`);
        for (const uid of op.uids) this.removeMsg(u, mb, uid);
        if (op.modseq > mb.highestModseq) mb.highestModseq = op.modseq;
        return;
      }
      case 'copy': {
        const u = this.users.get(op.user);
        const src = u?.mailboxes.get(op.from);
        const dst = u?.mailboxes.get(op.to);
        if (!u || !src || !dst) return void this.problems.push(`copy between missing mailboxes ${op.user}/${op.from} -> ${op.to}`);
        for (const [from, to, modseq] of op.map) {
          const m = src.msgs.get(from);
          if (!m) continue;
          this.addMsg(u, dst, { ...m, flags: [...m.flags], uid: to, modseq });
        }
        return;
      }
      case 'meta': {
        const b = this.bodies.get(op.body);
        if (!b) return;
        (b.meta ??= {})[op.kind] = op.value;
        return;
      }
    }
  }

  // ---- snapshots (checkpoints) ----

  snapshot(extra: Record<string, unknown>): Buffer {
    const bodyIndex = new Map<string, number>();
    const bodies: unknown[] = [];
    for (const [id, b] of this.bodies) {
      bodyIndex.set(id, bodies.length);
      bodies.push([id, b.size, b.chunks.flatMap((c) => [c.offset, c.length]), b.meta ?? 0]);
    }
    const users: unknown[] = [];
    for (const u of this.users.values()) {
      const boxes: unknown[] = [];
      for (const mb of u.mailboxes.values()) {
        const msgs: unknown[] = [];
        for (const m of mb.msgs.values()) msgs.push([m.uid, bodyIndex.get(m.body) ?? -1, m.size, m.date, m.flags.length ? m.flags.join(' ') : 0, m.modseq]);
        boxes.push([mb.name, mb.uidValidity, mb.uidNext, mb.highestModseq, mb.specialUse ?? 0, msgs]);
      }
      users.push([u.name, boxes, [...u.subscriptions]]);
    }
    // Delivery ids only need to outlive the proxies' retries: a week is plenty.
    const deliveries: unknown[] = [];
    const since = Date.now() - DELIVERY_KEEP_MS;
    for (const [id, d] of this.deliveries) if (d.at >= since) deliveries.push([id, d.at, d.users]);
    return Buffer.from(JSON.stringify({ v: 1, nextUidValidity: this.nextUidValidity, bodies, users, deliveries, extra }));
  }

  static fromSnapshot(buf: Buffer): { state: StoreState; extra: Record<string, unknown> } {
    const s = JSON.parse(buf.toString('utf8')) as {
      v: number;
      nextUidValidity: number;
      bodies: Array<[string, number, number[], Record<string, string> | 0]>;
      users: Array<[string, Array<[string, number, number, number, SpecialUse | 0, Array<[number, number, number, number, string | 0, number]>]>, string[]]>;
      deliveries: Array<[string, number, Record<string, number>]>;
      extra: Record<string, unknown>;
    };
    const st = new StoreState();
    st.nextUidValidity = s.nextUidValidity;
    const ids: string[] = [];
    for (const [id, size, flat, meta] of s.bodies) {
      const chunks: BodyChunk[] = [];
      for (let i = 0; i < flat.length; i += 2) chunks.push({ offset: flat[i]!, length: flat[i + 1]! });
      const b: Body = { size, refs: 0, chunks };
      if (meta) b.meta = meta;
      st.bodies.set(id, b);
      ids.push(id);
    }
    for (const [name, boxes, subs] of s.users) {
      const u: User = { name, mailboxes: new Map(), subscriptions: new Set(subs), usedBytes: 0 };
      for (const [mname, uv, uidNext, hms, special, msgs] of boxes) {
        const mb: Mailbox = { name: mname, uidValidity: uv, uidNext, highestModseq: hms, specialUse: special || undefined, msgs: new Map() };
        for (const [uid, bi, size, date, flags, modseq] of msgs) {
          const body = ids[bi];
          if (body === undefined) {
            st.problems.push(`checkpoint: message ${name}/${mname}/${uid} links no body`);
            continue;
          }
          mb.msgs.set(uid, { uid, body, size, date, flags: flags ? flags.split(' ') : [], modseq });
          u.usedBytes += size;
          st.bodies.get(body)!.refs += 1;
        }
        u.mailboxes.set(mname, mb);
      }
      st.users.set(name, u);
    }
    for (const [id, at, users] of s.deliveries) st.deliveries.set(id, { at, users });
    return { state: st, extra: s.extra };
  }
}
