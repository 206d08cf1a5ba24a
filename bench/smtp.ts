/**
 * bench/smtp: messages per second delivered through the proxy's MX front end (SMTP in, LMTP
 * fan-out to the home pairs) against straight LMTP to the same Dovecot instances, interleaved
 * in the same run.
 *
 *   npm run bench -- smtp [--seconds 3] [--concurrency 8] [--rounds 2]
 *
 * Two Dovecot instances (test/helpers/dovecot.ts) stand in for two pairs. The proxy's SMTP
 * front end runs in a child process (this file with --serve) with the proxy's real PairHealth
 * polling a /health endpoint per pair; its directory is an in-memory table of the bench users
 * (directory/index.ts is measured by its own bench). Clients: nodemailer, --concurrency pooled
 * connections, each message acknowledged before the next on its connection; the same for the
 * direct path (nodemailer in LMTP mode, one pooled transport per Dovecot, a message to users on
 * two pairs = one delivery to each, in parallel). Scenarios: 1 KiB and 50 KiB to one recipient,
 * 1 KiB to four recipients on two pairs. Target (informational): proxy >= 0.5x direct LMTP.
 * Ends with one JSON line.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import http from 'node:http';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import type { AddressInfo } from 'node:net';
import nodemailer from 'nodemailer';

const { values: args } = parseArgs({
  options: {
    seconds: { type: 'string', default: '3' },
    concurrency: { type: 'string', default: '8' },
    rounds: { type: 'string', default: '2' },
    serve: { type: 'string' },
    help: { type: 'boolean', default: false },
  },
});
if (args.help) {
  process.stdout.write('usage: npm run bench -- smtp [--seconds 3] [--concurrency 8] [--rounds 2]\n');
  process.exit(0);
}
const SECONDS = Number(args.seconds);
const CONCURRENCY = Number(args.concurrency);
const ROUNDS = Number(args.rounds);
const USERS = [
  { uid: 'u0', pair: 'pair-a' },
  { uid: 'u1', pair: 'pair-a' },
  { uid: 'u2', pair: 'pair-b' },
  { uid: 'u3', pair: 'pair-b' },
];

function message(size: number, n: number): Buffer {
  const head = `From: Bench <bench@remote.example>\r\nTo: u0@example.net\r\nSubject: bench ${n}\r\nMessage-ID: <bench-${n}-${size}-${process.pid}-${Date.now()}@remote.example>\r\n\r\n`;
  const line = 'Benchmark body line with ordinary text, seventy-odd characters long...\r\n';
  return Buffer.from(head + line.repeat(Math.max(1, Math.ceil((size - head.length) / line.length))));
}

// ---- the proxy (child process) ------------------------------------------------------------

async function serve(spec: string): Promise<void> {
  const { lmtpA, lmtpB } = JSON.parse(spec) as { lmtpA: number; lmtpB: number };
  const { startSmtpFrontEnds } = await import('../proxy/smtp/index.ts');
  const { PairHealth } = await import('../proxy/pair-health.ts');
  const { createRegistry } = await import('../common/metrics.ts');
  const { silentLogger } = await import('../common/log.ts');
  type PairRecord = import('../directory/types.ts').PairRecord;
  type Directory = import('../directory/types.ts').Directory;
  const health = http.createServer((req, res) => {
    const pair = req.url?.includes('b') ? 'pair-b' : 'pair-a';
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ pair, at: Date.now(), state: 'ok', primary: 'a', nodes: { a: { heartbeat: 'up', role: 'primary', disk: 'UpToDate' }, b: { heartbeat: 'up', role: 'secondary', disk: 'UpToDate' } }, replication: { connection: 'Connected', protocol: 'C', outOfSyncBytes: 0 }, store: { mailboxes: 4, messages: 0, bytesUsed: 0, bytesTotal: 1 }, sessions: { imap: 0, pop3: 0, lmtp: 0 } }));
  });
  // One admin port per pair: /health on each (the path tells which pair answers).
  const adminA = http.createServer((req, res) => health.emit('request', Object.assign(req, { url: '/a' }), res));
  const adminB = http.createServer((req, res) => health.emit('request', Object.assign(req, { url: '/b' }), res));
  await Promise.all([adminA, adminB].map((s) => new Promise<void>((r) => s.listen(0, '127.0.0.1', r))));
  const pairs: PairRecord[] = [
    { id: 'pair-a', dn: 'cn=pair-a', address: '127.0.0.1', ports: { lmtp: lmtpA, admin: (adminA.address() as AddressInfo).port }, state: 'active', weight: 1 },
    { id: 'pair-b', dn: 'cn=pair-b', address: '127.0.0.1', ports: { lmtp: lmtpB, admin: (adminB.address() as AddressInfo).port }, state: 'active', weight: 1 },
  ];
  const users = USERS.map((u) => ({ dn: `uid=${u.uid}`, uid: u.uid, mail: `${u.uid}@example.net`, aliases: [], pair: u.pair }));
  const none = async (): Promise<never> => {
    throw new Error('not used');
  };
  const directory: Directory = {
    findLogin: none,
    findRecipient: async (a) => users.find((u) => u.mail === a.toLowerCase()) ?? null,
    authenticate: none,
    routeFor: async (user) => ({ user, pair: pairs.find((p) => p.id === user.pair)! }),
    listPairs: async () => pairs,
    getPair: async (id) => pairs.find((p) => p.id === id) ?? null,
    placeNewUser: none,
    addUser: none,
    setUserPair: none,
    invalidate: async () => undefined,
    close: async () => undefined,
  };
  const pairHealth = new PairHealth({ log: silentLogger, directory, pollIntervalMs: 1000 });
  await pairHealth.start();
  const smtp = await startSmtpFrontEnds(
    { smtp: { hostname: 'bench.mx', localDomains: ['example.net'], listeners: [{ kind: 'mx', host: '127.0.0.1', port: 0, tls: 'none' }], limits: { maxConnectionsPerIp: 0 } } },
    { directory, pairHealth, log: silentLogger, registry: createRegistry({}, false) },
  );
  process.stdout.write(`READY ${smtp.address('mx')!.port}\n`);
  process.on('SIGTERM', () => {
    void smtp.close(100).then(() => process.exit(0));
  });
}

// ---- the load generator ---------------------------------------------------------------------

type Sender = (to: string[], raw: Buffer) => Promise<void>;

async function measure(send: Sender, size: number, to: string[]): Promise<number> {
  let done = 0;
  let failed = 0;
  const deadline = Date.now() + SECONDS * 1000;
  let n = 0;
  const worker = async () => {
    while (Date.now() < deadline) {
      try {
        await send(to, message(size, n++));
        done++;
      } catch (err) {
        failed++;
        if (failed > 20) throw err;
      }
    }
  };
  const t0 = Date.now();
  await Promise.all(Array.from({ length: CONCURRENCY }, worker));
  return done / ((Date.now() - t0) / 1000);
}

async function main(): Promise<void> {
  const { startDovecot } = await import('../test/helpers/dovecot.ts');
  const dovUsers = USERS.map((u) => ({ user: u.uid, password: 'x' }));
  const [dovA, dovB] = await Promise.all([startDovecot({ users: dovUsers }), startDovecot({ users: dovUsers })]);
  let child: ChildProcess | null = null;
  try {
    child = spawn(process.execPath, ['--import', 'tsx', fileURLToPath(import.meta.url), '--serve', JSON.stringify({ lmtpA: dovA.lmtpPort, lmtpB: dovB.lmtpPort })], { stdio: ['ignore', 'pipe', 'inherit'] });
    const proxyPort = await new Promise<number>((resolve, reject) => {
      let out = '';
      const t = setTimeout(() => reject(new Error('proxy child did not start')), 30_000);
      child!.stdout!.on('data', (d: Buffer) => {
        out += d.toString();
        const m = /READY (\d+)/.exec(out);
        if (m) {
          clearTimeout(t);
          resolve(Number(m[1]));
        }
      });
      child!.once('exit', (code) => reject(new Error(`proxy child exited ${code}`)));
    });
    const pool = { pool: true, maxConnections: CONCURRENCY, maxMessages: Infinity, connectionTimeout: 5000, socketTimeout: 30_000 };
    const proxy = nodemailer.createTransport({ host: '127.0.0.1', port: proxyPort, secure: false, ignoreTLS: true, ...pool } as never);
    const lmtpA = nodemailer.createTransport({ host: '127.0.0.1', port: dovA.lmtpPort, lmtp: true, ignoreTLS: true, ...pool } as never);
    const lmtpB = nodemailer.createTransport({ host: '127.0.0.1', port: dovB.lmtpPort, lmtp: true, ignoreTLS: true, ...pool } as never);
    const pairOf = new Map(USERS.map((u) => [`${u.uid}@example.net`, u.pair]));
    const viaProxy: Sender = async (to, raw) => {
      const info = await proxy.sendMail({ envelope: { from: 'bench@remote.example', to }, raw });
      if (!/^250 /.test(info.response)) throw new Error(info.response);
    };
    const direct: Sender = async (to, raw) => {
      const a = to.filter((t) => pairOf.get(t) === 'pair-a').map((t) => t.replace('@example.net', '@pair-a'));
      const b = to.filter((t) => pairOf.get(t) === 'pair-b').map((t) => t.replace('@example.net', '@pair-b'));
      await Promise.all([
        a.length ? lmtpA.sendMail({ envelope: { from: 'bench@remote.example', to: a }, raw }) : null,
        b.length ? lmtpB.sendMail({ envelope: { from: 'bench@remote.example', to: b }, raw }) : null,
      ]);
    };
    const scenarios = [
      { name: '1 KiB x1 rcpt', size: 1024, to: ['u0@example.net'] },
      { name: '50 KiB x1 rcpt', size: 50 * 1024, to: ['u2@example.net'] },
      { name: '1 KiB x4 rcpt, 2 pairs', size: 1024, to: USERS.map((u) => `${u.uid}@example.net`) },
    ];
    // Warm-up (connections, Dovecot processes).
    await measure(viaProxy, 1024, ['u0@example.net']).catch(() => 0);
    await measure(direct, 1024, ['u0@example.net']).catch(() => 0);
    const rows: Array<{ name: string; proxy: number; direct: number }> = [];
    for (const s of scenarios) {
      const p: number[] = [];
      const d: number[] = [];
      for (let r = 0; r < ROUNDS; r++) {
        d.push(await measure(direct, s.size, s.to));
        p.push(await measure(viaProxy, s.size, s.to));
      }
      const med = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)]!;
      rows.push({ name: s.name, proxy: med(p), direct: med(d) });
    }
    proxy.close();
    lmtpA.close();
    lmtpB.close();
    const ratio = (r: { proxy: number; direct: number }) => r.proxy / r.direct;
    process.stdout.write(`\nbench smtp: ${CONCURRENCY} connections, ${SECONDS} s per measurement, median of ${ROUNDS} interleaved rounds\n\n`);
    process.stdout.write('| scenario | via proxy (msg/s) | straight LMTP (msg/s) | ratio |\n| --- | ---: | ---: | ---: |\n');
    for (const r of rows) process.stdout.write(`| ${r.name} | ${r.proxy.toFixed(1)} | ${r.direct.toFixed(1)} | ${ratio(r).toFixed(2)} |\n`);
    const minRatio = Math.min(...rows.map(ratio));
    const figures: Record<string, number> = {};
    rows.forEach((r, i) => {
      figures[`s${i}_proxy_msg_per_s`] = Math.round(r.proxy * 10) / 10;
      figures[`s${i}_lmtp_msg_per_s`] = Math.round(r.direct * 10) / 10;
    });
    process.stdout.write('\n' + JSON.stringify({ bench: 'smtp', figures, targets: { proxy_vs_lmtp: { value: Math.round(minRatio * 100) / 100, min: 0.5 } }, met: minRatio >= 0.5 }) + '\n');
  } finally {
    if (child && child.exitCode === null) {
      child.kill('SIGTERM');
      await new Promise((r) => setTimeout(r, 500));
      if (child.exitCode === null) child.kill('SIGKILL');
    }
    await Promise.all([dovA.close(), dovB.close()]);
  }
}

if (args.serve) await serve(args.serve);
else await main();
