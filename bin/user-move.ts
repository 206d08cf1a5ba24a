/**
 * Moving a user to another pair (rebalancing). Both pairs are reached over IMAP with the
 * master login on the user's behalf, so the move works against any backend that the proxy
 * works with (our store or Dovecot):
 *   1. live copy of every mailbox with flags and internal dates, while the user works on;
 *   2. block: proxies hold new logins and deliveries for the user (Redis `usermove` key) and
 *      close the user's open sessions; in-flight deliveries get a moment to land;
 *   3. delta copy until the source has nothing new, then verify message counts per mailbox;
 *   4. switch `mailHost`, invalidate every cache, lift the block (held sessions resume on the
 *      new pair), close any session still on the old pair;
 *   5. delete the old copy and check that the old pair holds nothing for the user.
 * Nothing delivered during the move is lost: before the block it is copied by a later pass,
 * during the block it waits in the proxy (or is retried by the sender after a 4xx), after the
 * switch it goes to the new pair.
 */
import cliProgress from 'cli-progress';
import { ImapFlow } from 'imapflow';
import type { Directory, PairRecord } from '../directory/types.ts';
import { keys, type RedisBus } from '../common/redis-bus.ts';
import { ConflictError, NotFoundError, UnavailableError } from '../common/errors.ts';
import { sleep } from './lab/wait.ts';

export interface MoveDeps {
  directory: Directory;
  /** Required: without the shared block the final delta could race with deliveries. */
  bus: RedisBus;
  masterUser: string;
  masterSecret: string;
  say(line: string): void;
  /** How long proxies may take to notice the block and finish in-flight deliveries. */
  settleMs?: number;
  /** Bound on the whole blocked phase; the block key expires after it even if this process dies. */
  blockMs?: number;
}

export interface MoveReport {
  uid: string;
  from: string;
  to: string;
  mailboxes: number;
  messages: number;
  bytes: number;
  blockedMs: number;
}

function connect(pair: PairRecord, uid: string, deps: MoveDeps): ImapFlow {
  const client = new ImapFlow({
    host: pair.address,
    port: pair.ports.imap ?? 143,
    secure: false,
    doSTARTTLS: false,
    auth: { user: deps.masterUser, pass: deps.masterSecret, authzid: uid, loginMethod: 'AUTH=PLAIN' },
    logger: false,
    connectionTimeout: 10_000,
    greetingTimeout: 10_000,
    socketTimeout: 60_000,
  });
  client.on('error', () => undefined);
  return client;
}

/** Which source messages (by mailbox and UID) already have a copy on the target. */
type Copied = Map<string, { uidValidity: bigint; uids: Set<number> }>;

interface CopyProgress {
  messages: number;
  bytes: number;
  tick(): void;
}

async function copyPass(src: ImapFlow, dst: ImapFlow, copied: Copied, progress: CopyProgress): Promise<number> {
  let copiedNow = 0;
  const dstPaths = new Set((await dst.list()).map((m) => m.path));
  for (const box of await src.list()) {
    if (box.flags.has('\\Noselect')) continue;
    if (!dstPaths.has(box.path)) {
      await dst.mailboxCreate(box.path);
      dstPaths.add(box.path);
    }
    const lock = await src.getMailboxLock(box.path, { readOnly: true });
    try {
      const mailbox = src.mailbox;
      if (typeof mailbox !== 'object') continue;
      let state = copied.get(box.path);
      if (!state || state.uidValidity !== mailbox.uidValidity) {
        state = { uidValidity: mailbox.uidValidity, uids: new Set() };
        copied.set(box.path, state);
      }
      if (mailbox.exists === 0) continue;
      const todo: number[] = [];
      for await (const m of src.fetch('1:*', { uid: true }, { uid: false })) if (!state.uids.has(m.uid)) todo.push(m.uid);
      for (const uid of todo) {
        const msg = await src.fetchOne(String(uid), { uid: true, flags: true, internalDate: true, source: true }, { uid: true });
        if (!msg || !msg.source) continue; // expunged meanwhile
        const flags = [...(msg.flags ?? [])].filter((f) => f !== '\\Recent');
        await dst.append(box.path, msg.source, flags, msg.internalDate);
        state.uids.add(uid);
        copiedNow++;
        progress.messages++;
        progress.bytes += msg.source.length;
        progress.tick();
      }
    } finally {
      lock.release();
    }
  }
  return copiedNow;
}

async function countMessages(client: ImapFlow): Promise<Map<string, number>> {
  const out = new Map<string, number>();
  for (const box of await client.list()) {
    if (box.flags.has('\\Noselect')) continue;
    const st = await client.status(box.path, { messages: true });
    out.set(box.path, st.messages ?? 0);
  }
  return out;
}

async function deleteOldCopy(src: ImapFlow): Promise<void> {
  for (const box of await src.list()) {
    if (box.flags.has('\\Noselect')) continue;
    const lock = await src.getMailboxLock(box.path);
    try {
      if (typeof src.mailbox === 'object' && src.mailbox.exists > 0) await src.messageDelete('1:*');
    } finally {
      lock.release();
    }
    if (box.path.toUpperCase() !== 'INBOX') await src.mailboxDelete(box.path).catch(() => undefined);
  }
}

export async function moveUser(login: string, toPairId: string, deps: MoveDeps): Promise<MoveReport> {
  const user = await deps.directory.findLogin(login);
  if (!user) throw new NotFoundError(`no user ${login}`);
  const from = (await deps.directory.routeFor(user)).pair;
  const to = await deps.directory.getPair(toPairId);
  if (!to) throw new NotFoundError(`no pair ${toPairId}`);
  if (to.state !== 'active') throw new ConflictError(`pair ${to.id} is ${to.state}; users move only to active pairs`);
  if (from.id === to.id) throw new ConflictError(`${user.uid} already lives on ${to.id}`);
  if (!deps.bus.connected) throw new UnavailableError('a user move needs Redis (the shared block of new sessions); Redis is not connected');

  const src = connect(from, user.uid, deps);
  const dst = connect(to, user.uid, deps);
  await Promise.all([src.connect(), dst.connect()]);
  const bar = process.stdout.isTTY
    ? new cliProgress.SingleBar({ format: `  copying ${user.uid} [{bar}] {value} messages | {bytes} bytes` }, cliProgress.Presets.shades_classic)
    : null;
  const progress: CopyProgress = { messages: 0, bytes: 0, tick: () => bar?.update(progress.messages, { bytes: progress.bytes }) };
  const blockMs = deps.blockMs ?? 60_000;
  let blockedAt = 0;
  let switched = false;
  try {
    const already = [...(await countMessages(dst)).values()].reduce((a, b) => a + b, 0);
    if (already > 0) throw new ConflictError(`${to.id} already holds ${already} message(s) for ${user.uid}; clean it up before moving`);
    const total = [...(await countMessages(src)).values()].reduce((a, b) => a + b, 0);
    deps.say(`moving ${user.uid} (${user.dn}) from ${from.id} to ${to.id}: ${total} message(s)`);
    bar?.start(total, 0, { bytes: 0 });

    const copied: Copied = new Map();
    await copyPass(src, dst, copied, progress);
    bar?.stop();
    deps.say(`  live copy: ${progress.messages} message(s), ${progress.bytes} bytes`);

    blockedAt = Date.now();
    await deps.bus.set(keys.userMove(user.uid), JSON.stringify({ from: from.id, to: to.id, at: blockedAt }), blockMs);
    await deps.bus.publish({ type: 'user-close-sessions', user: user.uid });
    await sleep(deps.settleMs ?? 2000);
    for (let pass = 0; ; pass++) {
      const n = await copyPass(src, dst, copied, progress);
      if (n === 0) break;
      deps.say(`  delta pass ${pass + 1}: ${n} message(s)`);
      if (Date.now() - blockedAt > blockMs / 2) throw new UnavailableError('the source keeps changing while blocked; giving up before the block expires');
    }
    const [srcCounts, dstCounts] = await Promise.all([countMessages(src), countMessages(dst)]);
    for (const [path, n] of srcCounts) {
      if ((dstCounts.get(path) ?? 0) !== n) throw new ConflictError(`verify: ${path} has ${n} message(s) on ${from.id} but ${dstCounts.get(path) ?? 0} on ${to.id}`);
    }
    deps.say(`  verified: ${srcCounts.size} mailbox(es) match`);

    await deps.directory.setUserPair(user.uid, to.id);
    await deps.directory.invalidate([user.uid, user.mail, ...user.aliases]);
    switched = true;
    await deps.bus.del(keys.userMove(user.uid));
    await deps.bus.publish({ type: 'user-close-sessions', user: user.uid });
    const blockedMs = Date.now() - blockedAt;
    deps.say(`  switched mailHost to ${to.id}; new sessions were held for ${blockedMs} ms`);

    await deleteOldCopy(src);
    const left = [...(await countMessages(src)).values()].reduce((a, b) => a + b, 0);
    if (left > 0) throw new ConflictError(`${from.id} still holds ${left} message(s) for ${user.uid} after the cleanup`);
    deps.say(`  removed the old copy from ${from.id}`);
    return { uid: user.uid, from: from.id, to: to.id, mailboxes: srcCounts.size, messages: progress.messages, bytes: progress.bytes, blockedMs };
  } finally {
    bar?.stop();
    // A failed move before the switch leaves the user where they were, unblocked; the partial
    // copy on the target is reported by the next attempt's emptiness check.
    if (!switched && blockedAt) await deps.bus.del(keys.userMove(user.uid)).catch(() => undefined);
    await Promise.all([src.logout().catch(() => src.close()), dst.logout().catch(() => dst.close())]);
  }
}
