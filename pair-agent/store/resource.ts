/**
 * The store agent as a pair resource: on start it opens the mail store on the (primary)
 * replicated volume and serves LMTP, POP3 and IMAP on the pair's address; on stop it closes
 * every session, then flushes and checkpoints the store, so the volume can be demoted.
 */
import { readFileSync } from 'node:fs';
import { z } from 'zod';
import { durationMs, port, tlsSchema } from '../../common/config.ts';
import { AddressList } from '../../common/cidr.ts';
import { UnavailableError } from '../../common/errors.ts';
import type { Logger } from '../../common/log.ts';
import type { MetricsRegistry } from '../../common/metrics.ts';
import type { MonitorResult, Resource } from '../resource.ts';
import type { BlockDevice } from '../volume/block-device.ts';
import { startImapServer, type ImapServer } from './imap/index.ts';
import { openMailStore } from './index.ts';
import { startLmtpServer, type LmtpServer } from './lmtp.ts';
import { startPop3Server, type Pop3Server } from './pop3/server.ts';
import type { LogStore } from './store.ts';

/** A non-negative whole number (an explicit 0 is a value). */
const count = z.number().int().min(0);

export const storeConfigSchema = z
  .object({
    /** Ports on the pair's address (contract: imap 143, pop3 110, lmtp 24; 0 = ephemeral, for tests). */
    ports: z
      .object({
        lmtp: port.default(24),
        pop3: port.default(110),
        imap: port.default(143),
        /** Implicit-TLS POP3 (needs `tls`). */
        pop3s: port.optional(),
      })
      .strict()
      .default({}),
    /** The proxies' master account: SASL PLAIN authzid=<uid>, authcid=masterUser, password=masterSecret. */
    masterUser: z.string().min(1),
    masterSecret: z.string().min(8),
    /** Networks allowed to use the master login and XCLIENT/XFORWARD/ID forwarding (the proxies). */
    trusted: z.array(z.string()).default(['127.0.0.0/8', '::1']),
    /** Static user logins (trials, the lab); in production the proxy authenticates users. */
    users: z.record(z.string(), z.string()).optional(),
    /** Per-user quota in bytes; unset = unlimited. Over quota, LMTP answers 552 5.2.2 per recipient. */
    quotaBytes: z.number().int().positive().optional(),
    /** Read cache for message bodies, in bytes. */
    cacheBytes: z.number().int().min(0).default(64 * 1024 * 1024),
    /** Largest message LMTP accepts. */
    maxMessageBytes: z.number().int().positive().default(50 * 1024 * 1024),
    /** STLS/STARTTLS certificate and key files (PEM). */
    tls: tlsSchema.optional(),
    idleTimeoutMs: z
      .object({ imap: durationMs.default(30 * 60_000), pop3: durationMs.default(10 * 60_000), lmtp: durationMs.default(5 * 60_000) })
      .strict()
      .default({}),
    /** Background compaction I/O bound (bytes/s); 0 turns background compaction off. */
    compactBytesPerSec: z.number().int().min(0).default(32 * 1024 * 1024),
    /**
     * On stop (a hand-over, rolling maintenance), how long open IMAP/POP3 sessions may go on to
     * finish on their own before they are closed; new logins wait at the proxies meanwhile.
     */
    stopGraceMs: durationMs.default(2000),
    /** Log bytes between index checkpoints (default: an eighth of the volume, 8..256 MiB). */
    checkpointBytes: z.number().int().positive().optional(),
    /** IMAP engine bounds (pair-agent/store/imap/limits.ts has each one's meaning and default; 0 is refused where it would stop every session). */
    imap: z
      .object({
        maxSessionsPerUser: count.optional(),
        maxAuthFailures: count.optional(),
        maxBadCommands: count.optional(),
        maxLineBytes: count.min(1).optional(),
        maxLiteralBytes: count.optional(),
        maxCommandBytes: count.min(1).optional(),
        maxPipelined: count.min(1).optional(),
        maxWriteBufferBytes: count.optional(),
        preLoginIdleMs: count.optional(),
        /** `* OK Still here` interval during IDLE, so that NAT boxes keep the connection (2 min). */
        idleKeepaliveMs: durationMs.optional(),
      })
      .strict()
      .default({}),
  })
  .strict();

export type StoreConfig = z.output<typeof storeConfigSchema>;

export interface StoreHealth {
  running: boolean;
  mailboxes: number;
  messages: number;
  bytesUsed: number;
  bytesTotal: number;
  /** LMTP delivery latency over the last 256 deliveries. */
  deliveryLatencyMs?: { samples: number; avgMs: number; p95Ms: number };
  ports?: { lmtp: number; pop3: number; imap: number };
}

export interface StoreResource extends Resource {
  health(): StoreHealth;
  sessions(): { imap: number; pop3: number; lmtp: number };
  /** The open store while running (tests, tools). */
  store(): LogStore | null;
  ports(): { lmtp: number; pop3: number; imap: number } | null;
}

export function createStoreResource(args: {
  config: StoreConfig;
  device: BlockDevice;
  listenHost: string;
  log: Logger;
  registry: MetricsRegistry;
}): StoreResource {
  const { config, device, listenHost, registry } = args;
  const log = args.log.child({ resource: 'store' });
  const trusted = new AddressList(config.trusted, 'store.trusted');
  let store: LogStore | null = null;
  let lmtp: LmtpServer | null = null;
  let pop3: Pop3Server | null = null;
  let imap: ImapServer | null = null;
  let busy: Promise<void> = Promise.resolve();
  const serial = (fn: () => Promise<void>) => {
    const p = busy.then(fn, fn);
    busy = p.catch(() => undefined);
    return p;
  };

  const stopAll = async (graceMs = 0) => {
    const servers = [imap, pop3, lmtp];
    imap = pop3 = lmtp = null;
    const [i, p, l] = servers;
    await Promise.all([
      i?.close(graceMs).catch((err: unknown) => log.warn({ err }, 'imap close failed')),
      p?.close(graceMs).catch((err: unknown) => log.warn({ err }, 'pop3 close failed')),
      l?.close().catch((err: unknown) => log.warn({ err }, 'lmtp close failed')),
    ]);
    const st = store;
    store = null;
    if (st) await st.close();
  };

  return {
    name: 'store',
    start: () =>
      serial(async () => {
        if (store) return;
        if (!device.writable) throw new UnavailableError('store volume is not writable (not primary)');
        const t0 = Date.now();
        const tlsFiles = config.tls ? { key: readFileSync(config.tls.key), cert: readFileSync(config.tls.cert) } : undefined;
        store = await openMailStore(device, {
          log,
          registry,
          quotaBytes: config.quotaBytes,
          cacheBytes: config.cacheBytes,
          compactBytesPerSec: config.compactBytesPerSec,
          checkpointBytes: config.checkpointBytes,
        });
        try {
          lmtp = await startLmtpServer({
            store,
            host: listenHost,
            port: config.ports.lmtp,
            log,
            registry,
            trusted,
            maxMessageBytes: config.maxMessageBytes,
            socketTimeoutMs: config.idleTimeoutMs.lmtp,
          });
          pop3 = await startPop3Server({
            store,
            host: listenHost,
            port: config.ports.pop3,
            tlsPort: config.ports.pop3s,
            tls: tlsFiles,
            masterUser: config.masterUser,
            masterSecret: config.masterSecret,
            trusted,
            users: config.users,
            log,
            registry,
            idleTimeoutMs: config.idleTimeoutMs.pop3,
          });
          const { idleKeepaliveMs, ...imapLimits } = config.imap;
          imap = await startImapServer({
            store,
            host: listenHost,
            port: config.ports.imap,
            ...(tlsFiles ? { tls: tlsFiles } : {}),
            masterUser: config.masterUser,
            masterSecret: config.masterSecret,
            trusted,
            ...(config.users ? { users: config.users } : {}),
            log,
            registry,
            idleTimeoutMs: config.idleTimeoutMs.imap,
            ...(idleKeepaliveMs !== undefined ? { idleKeepaliveMs } : {}),
            limits: imapLimits,
          });
        } catch (err) {
          await stopAll().catch(() => undefined);
          throw err;
        }
        log.info({ ms: Date.now() - t0, lmtp: lmtp.port, pop3: pop3.port, imap: imap.port, recovery: store.recovery.ms }, 'store started');
      }),
    stop: () =>
      serial(async () => {
        if (!store && !lmtp && !pop3 && !imap) return;
        const t0 = Date.now();
        // Only a healthy store lets its sessions finish: a failed one closes them at once.
        const healthy = store !== null && !store.closed && !store.failed() && device.writable;
        await stopAll(healthy ? config.stopGraceMs : 0);
        await device.flush().catch(() => undefined);
        log.info({ ms: Date.now() - t0 }, 'store stopped');
      }),
    async monitor(): Promise<MonitorResult> {
      if (!store) return 'stopped';
      if (store.closed || !device.writable || store.failed()) return 'failed';
      return 'running';
    },
    health(): StoreHealth {
      if (!store || store.closed) return { running: false, mailboxes: 0, messages: 0, bytesUsed: 0, bytesTotal: device.size };
      const c = store.counts();
      const p = this.ports();
      return {
        running: true,
        mailboxes: c.mailboxes,
        messages: c.messages,
        bytesUsed: store.bytesUsedNow(),
        bytesTotal: device.size,
        ...(lmtp ? { deliveryLatencyMs: lmtp.latency() } : {}),
        ...(p ? { ports: p } : {}),
      };
    },
    sessions() {
      return { imap: imap?.sessions() ?? 0, pop3: pop3?.sessions() ?? 0, lmtp: lmtp?.sessions() ?? 0 };
    },
    store: () => store,
    ports: () => (lmtp && pop3 && imap ? { lmtp: lmtp.port, pop3: pop3.port, imap: imap.port } : null),
  };
}
