/**
 * The lab's guided tour: mail in through the balancer's SMTP port to users on every pair, read
 * back over IMAP and POP3 through the balancer, then SIGKILL one pair's primary node and show
 * the failover as it happens — how long until the pair serves again, and that nothing
 * delivered was lost. Ends with the status table. Every step is bounded in time.
 */
import { randomBytes } from 'node:crypto';
import type { HealthRecord } from '../../common/health.ts';
import { collectStatus, renderStatus } from '../status.ts';
import { imapListInbox, pop3ListSubjects, sendMail } from './clients.ts';
import type { LabPlan, LabUser } from './plan.ts';
import type { LabState } from './supervisor.ts';
import { clusterFile } from './role-configs.ts';
import { sleep } from './wait.ts';

export interface TourHooks {
  say(line: string): void;
  pidOf(processName: string): number | undefined;
  /** Re-reads the lab's state (when the tour runs in another shell than `lab up`). */
  refreshPids?: () => LabState | null;
}

async function pairHealth(plan: LabPlan, pairId: string): Promise<HealthRecord | null> {
  const pair = plan.pairs.find((p) => p.id === pairId)!;
  try {
    const res = await fetch(`http://${pair.address}:${pair.ports.admin}/health`, { signal: AbortSignal.timeout(800) });
    return (await res.json()) as HealthRecord;
  } catch {
    return null;
  }
}

const ms = (n: number) => `${(n / 1000).toFixed(2)} s`;

/** Runs fn until it resolves or timeoutMs passes; returns the time it took, or null. */
async function until(fn: () => Promise<unknown>, timeoutMs: number, intervalMs = 100): Promise<number | null> {
  const start = Date.now();
  while (Date.now() - start < timeoutMs) {
    try {
      await fn();
      return Date.now() - start;
    } catch {
      await sleep(intervalMs);
    }
  }
  return null;
}

export async function runTour(plan: LabPlan, hooks: TourHooks): Promise<boolean> {
  const { say } = hooks;
  const lb = plan.loadbalancer;
  const smtp = { host: lb.host, port: lb.smtpPort };
  const imap = { host: lb.host, port: lb.imapPort };
  const pop3 = { host: lb.host, port: lb.pop3Port };
  const tag = randomBytes(3).toString('hex');
  let ok = true;
  const fail = (line: string) => {
    ok = false;
    say(`  FAILED: ${line}`);
  };

  // One user per pair, so the tour crosses every pair.
  const cast: LabUser[] = plan.pairs.map((p) => plan.users.find((u) => u.pair === p.id)!).filter(Boolean);
  const expected = new Map<string, string[]>(cast.map((u) => [u.uid, []]));

  say(`tour ${tag} 1/4: delivering through the load balancer's SMTP port (${smtp.host}:${smtp.port})`);
  for (const u of cast) {
    const subject = `tour ${tag}: hello ${u.uid}`;
    const r = await sendMail(smtp, { from: `tour@example.net`, to: [u.mail], subject, text: `Delivered to ${u.pair}.\n` }).catch((e: Error) => e);
    if (r instanceof Error) fail(`deliver to ${u.mail}: ${r.message}`);
    else {
      expected.get(u.uid)!.push(subject);
      say(`  ${u.mail} (${u.pair}): ${r.response}`);
    }
  }
  const everyone = `tour ${tag}: one message, every pair`;
  const r = await sendMail(smtp, { from: 'tour@example.net', to: cast.map((u) => u.mail), subject: everyone, text: 'One copy per pair.\n' }).catch(
    (e: Error) => e,
  );
  if (r instanceof Error) fail(`deliver to ${cast.length} users on ${cast.length} pairs: ${r.message}`);
  else {
    for (const u of cast) expected.get(u.uid)!.push(everyone);
    say(`  ${cast.map((u) => u.uid).join(' + ')} across ${cast.length} pairs in one transaction: ${r.response}`);
  }

  say(`tour ${tag} 2/4: reading it back through the balancer over IMAP (${imap.port}) and POP3 (${pop3.port})`);
  for (const u of cast) {
    const want = expected.get(u.uid)!;
    const viaImap = await imapListInbox(imap, { user: u.uid, password: u.password }).catch((e: Error) => e);
    if (viaImap instanceof Error) fail(`IMAP login as ${u.uid}: ${viaImap.message}`);
    else {
      const missing = want.filter((s) => !viaImap.some((m) => m.subject === s));
      if (missing.length) fail(`IMAP ${u.uid} is missing ${missing.join('; ')}`);
      else say(`  IMAP ${u.uid}: ${viaImap.length} message(s) in INBOX, all ${want.length} from this tour present`);
    }
    const viaPop = await pop3ListSubjects(pop3, { user: u.uid, password: u.password }).catch((e: Error) => e);
    if (viaPop instanceof Error) fail(`POP3 login as ${u.uid}: ${viaPop.message}`);
    else {
      const missing = want.filter((s) => !viaPop.includes(s));
      if (missing.length) fail(`POP3 ${u.uid} is missing ${missing.join('; ')}`);
      else say(`  POP3 ${u.uid}: ${viaPop.length} message(s) in the maildrop, all ${want.length} from this tour present`);
    }
  }

  const victimPair = plan.pairs[0]!;
  const victimUser = cast.find((u) => u.pair === victimPair.id)!;
  const before = await pairHealth(plan, victimPair.id);
  const primary = before?.primary;
  say(`tour ${tag} 3/4: failover — SIGKILL the primary node of ${victimPair.id}`);
  if (!primary) {
    fail(`${victimPair.id} reports no primary (${before ? before.state : 'no health record'}); skipping the failover step`);
  } else {
    const name = `${victimPair.id}-${primary}`;
    const pid = hooks.refreshPids?.()?.processes.find((p) => p.name === name)?.pid ?? hooks.pidOf(name);
    if (!pid) fail(`no pid for ${name}`);
    else {
      const killedAt = Date.now();
      process.kill(pid, 'SIGKILL');
      say(`  killed ${name} (pid ${pid}); watching ${victimPair.id}'s health and IMAP logins through the balancer…`);
      let lastState = '';
      let served: number | null = null;
      while (Date.now() - killedAt < 30_000 && served === null) {
        const h = await pairHealth(plan, victimPair.id);
        const state = h ? `${h.state}, primary ${h.primary ?? 'none'}` : 'no answer from the floating address';
        if (state !== lastState) {
          say(`  +${ms(Date.now() - killedAt)}  ${victimPair.id}: ${state}`);
          lastState = state;
        }
        const login = await imapListInbox(imap, { user: victimUser.uid, password: victimUser.password }).catch(() => null);
        if (login && h?.primary && h.primary !== primary) served = Date.now() - killedAt;
        else await sleep(100);
      }
      if (served === null) fail(`${victimPair.id} did not serve again within 30 s`);
      else say(`  ${victimPair.id} serves again from node ${(await pairHealth(plan, victimPair.id))?.primary}: ${ms(served)} after the kill`);
    }
  }

  say(`tour ${tag} 4/4: nothing delivered was lost`);
  for (const u of cast) {
    const want = expected.get(u.uid)!;
    let missing: string[] = want;
    const took = await until(async () => {
      const msgs = await imapListInbox(imap, { user: u.uid, password: u.password });
      missing = want.filter((s) => !msgs.some((m) => m.subject === s));
      if (missing.length) throw new Error('missing');
    }, 10_000, 300);
    if (took === null) fail(`${u.uid} on ${u.pair} lost ${missing.join('; ') || 'access'}`);
    else say(`  ${u.uid} (${u.pair}): all ${want.length} tour messages present`);
  }

  // Let the killed node rejoin and resync before the table, so it shows the pair whole again.
  await until(async () => {
    const h = await pairHealth(plan, victimPair.id);
    if (!h || h.state !== 'ok' || h.replication.outOfSyncBytes > 0) throw new Error('not yet');
  }, 15_000, 500);
  say('');
  say(renderStatus(await collectStatus(clusterFile(plan), plan.redis.url)));
  say(ok ? `tour ${tag}: all steps passed` : `tour ${tag}: some steps FAILED`);
  return ok;
}
