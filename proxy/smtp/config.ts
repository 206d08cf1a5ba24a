/**
 * The `smtp:` section of the proxy config (served by proxy/smtp). Every key documented here;
 * durations in milliseconds; an explicit 0 is a value (0 = no limit where a limit is meant).
 *
 *   smtp:
 *     hostname: mx1.example.net        # greeting, Received headers
 *     localDomains: [example.net]      # recipients here that the directory does not know: 550 5.1.1
 *     listeners:
 *       - { kind: mx, port: 25 }                           # STARTTLS offered when a certificate is set
 *       - { kind: submission, port: 587, tls: starttls }   # AUTH after STARTTLS
 *       - { kind: submission, port: 465, tls: implicit }
 *     smarthost: { host: relay.example.net, port: 587, requireTls: true, user: proxy, pass: "${SMARTHOST_PASS}" }
 */
import { durationMs, port, tlsSchema, z } from '../../common/config.ts';

export const smtpListenerSchema = z
  .object({
    /** `mx`: inbound mail for local recipients only (never a relay); `submission`: AUTH required, relays through the smarthost. */
    kind: z.enum(['mx', 'submission']),
    host: z.string().default('0.0.0.0'),
    port,
    /** `none`, `starttls` (offered; required before AUTH on submission), `implicit` (465: TLS from the first byte). */
    tls: z.enum(['none', 'starttls', 'implicit']).default('starttls'),
    /** Name for logs and metrics (default `<kind>-<port>`). */
    name: z.string().optional(),
  })
  .strict();

export const smtpConfigSchema = z
  .object({
    /** Host name in the greeting, EHLO reply and Received headers. */
    hostname: z.string().min(1).default('pairgate'),
    /**
     * Domains this tier is the final destination for. An address in one of them that the
     * directory does not know is refused 550 5.1.1; any other unknown address is a relay
     * attempt (550 5.7.1 on MX; smarthost or 550 5.7.1 on submission). Empty: every unknown
     * address on MX is 550 5.1.1.
     */
    localDomains: z.array(z.string().min(1)).default([]),
    listeners: z.array(smtpListenerSchema).default([]),
    /** Certificate for STARTTLS and implicit TLS; default: the proxy's `tls`. */
    tls: tlsSchema.optional(),
    limits: z
      .object({
        /** Largest message accepted (SIZE, and checked while reading DATA): 552 5.3.4 above. */
        maxMessageBytes: z.number().int().min(1024).default(50 * 1024 * 1024),
        /** Recipients per message: 452 4.5.3 above (the sender sends the rest later). */
        maxRecipients: z.number().int().min(1).default(100),
        /** Open SMTP connections on this proxy (0 = no limit). */
        maxConnections: z.number().int().min(0).default(2000),
        /** Open SMTP connections from one client address (0 = no limit). */
        maxConnectionsPerIp: z.number().int().min(0).default(20),
        /** Idle time waiting for a command (or DATA bytes) before 421 4.4.2. */
        commandTimeoutMs: durationMs.default(5 * 60_000),
        /** Longest a whole connection may last (0 = no limit). */
        sessionTimeoutMs: durationMs.default(30 * 60_000),
        /** Longest command line (RFC 5321 allows 512; AUTH lines are longer). */
        maxLineBytes: z.number().int().min(512).default(4096),
        /** Commands before MAIL/AUTH (HELO, NOOP, bad ones…) before the connection is closed. */
        maxUnauthenticatedCommands: z.number().int().min(1).default(20),
      })
      .strict()
      .default({}),
    delivery: z
      .object({
        /** LMTP port of pairs without an `lmtp=` override in pairgatePorts. */
        lmtpPort: port.default(24),
        connectTimeoutMs: durationMs.default(5000),
        /** Bound on each LMTP reply (the replies after DATA included). */
        replyTimeoutMs: durationMs.default(60_000),
        /**
         * Longest a delivery waits for a pair that is failing over (or right after an LMTP
         * connect failed) before the message gets 451. Default: the proxy's `hold.maxMs`.
         */
        holdMs: durationMs.optional(),
        /** Pause between LMTP attempts while holding. Default: the proxy's `hold.retryMs`. */
        retryMs: durationMs.optional(),
        /** How long RCPT waits for a pair that is failing over before accepting it (the delivery then holds). */
        rcptWaitMs: durationMs.default(0),
        /** Concurrent LMTP connections to one pair from this proxy (0 = no limit); further deliveries wait (within the hold time). */
        maxConnectionsPerPair: z.number().int().min(0).default(64),
        /** How long an LMTP connection is kept open for the next message from the same client to the same pair (0 = one connection per message). */
        idleConnectionMs: durationMs.default(5000),
        /** Send the client address to the pair (LMTP XCLIENT, else XFORWARD, when the pair offers them). */
        forwardClientAddress: z.boolean().default(true),
      })
      .strict()
      .default({}),
    submission: z
      .object({
        /** MAIL FROM must be one of the authenticated user's addresses (mail or mailLocalAddress); else 553 5.7.1. */
        enforceSender: z.boolean().default(true),
      })
      .strict()
      .default({}),
    /** Where submission sends non-local recipients. Absent: they are refused 550 5.7.1. */
    smarthost: z
      .object({
        host: z.string().min(1),
        port: port.default(587),
        /** TLS from the first byte (465). */
        secure: z.boolean().default(false),
        /** Refuse to relay unless STARTTLS succeeds. */
        requireTls: z.boolean().default(false),
        /** Check the smarthost's certificate. */
        verifyTls: z.boolean().default(true),
        user: z.string().optional(),
        /** Use `${SMARTHOST_PASS}` to keep it out of the file. */
        pass: z.string().optional(),
        timeoutMs: durationMs.default(30_000),
      })
      .strict()
      .optional(),
  })
  .strict();

export type SmtpConfig = z.output<typeof smtpConfigSchema>;
export type SmtpListenerConfig = z.output<typeof smtpListenerSchema>;
