/**
 * Per-connection accounting of the store's servers on the paths where a connection ends early or
 * abruptly: the POP3 maildrop lock of a session whose socket dies while its login is still reading
 * the mailbox, and the LMTP session count of a connection that leaves before smtp-server calls
 * onConnect (a TCP check that connects and closes, a client refused at maxClients).
 */
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AddressList } from '../../common/cidr.ts';
import { createRegistry } from '../../common/metrics.ts';
import { silentLogger } from '../../common/log.ts';
import type { MailStore } from '../../pair-agent/store/types.ts';
import { startPop3Server } from '../../pair-agent/store/pop3/server.ts';
import { startLmtpServer } from '../../pair-agent/store/lmtp.ts';
import { startHarness, MASTER, type Harness } from './imap-harness.ts';
import { waitFor } from '../helpers/net.ts';

/** The store with `listMessages` held until `release()` (and `entered` resolved when one is held). */
function gatedStore(store: MailStore): { store: MailStore; entered: () => Promise<void>; release: () => void } {
  let opened: () => void = () => undefined;
  let openGate: Promise<void> = new Promise((r) => (opened = r));
  let enteredNow: () => void = () => undefined;
  let entered: Promise<void> = new Promise((r) => (enteredNow = r));
  const wrapped = new Proxy(store, {
    get(t, k) {
      const v = Reflect.get(t, k, t) as unknown;
      if (k === 'listMessages') {
        return async (...args: unknown[]) => {
          enteredNow();
          await openGate;
          return (v as (...a: unknown[]) => unknown).apply(t, args);
        };
      }
      return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(t) : v;
    },
  });
  return {
    store: wrapped,
    entered: () => entered,
    release: () => {
      opened();
      openGate = Promise.resolve();
      entered = Promise.resolve();
    },
  };
}

class Lines {
  buf = '';
  closed = false;
  constructor(readonly socket: net.Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => (this.buf += d));
    socket.on('close', () => (this.closed = true));
    socket.on('error', () => undefined);
  }
  static async open(port: number): Promise<Lines> {
    const s = net.connect({ host: '127.0.0.1', port });
    await new Promise<void>((resolve, reject) => {
      s.once('connect', resolve);
      s.once('error', reject);
    });
    return new Lines(s);
  }
  async until(re: RegExp, timeoutMs = 5000): Promise<string> {
    await waitFor(() => re.test(this.buf) || undefined, timeoutMs, `${re} in ${JSON.stringify(this.buf)}`, 5);
    return this.buf;
  }
}

describe('store servers: per-connection accounting on abrupt ends', () => {
  let harness: Harness;

  beforeAll(async () => {
    harness = await startHarness();
  });
  afterAll(async () => {
    await harness?.close();
  });

  it('POP3: a session whose socket dies while its login reads the maildrop releases the [IN-USE] lock', async () => {
    await harness.deliver(['carol'], 'Subject: lock\r\n\r\nbody\r\n');
    const gate = gatedStore(harness.store);
    const pop3 = await startPop3Server({
      store: gate.store,
      host: '127.0.0.1',
      port: 0,
      masterUser: MASTER.user,
      masterSecret: MASTER.secret,
      trusted: new AddressList(['127.0.0.0/8']),
      users: { carol: 'carol-pw' },
      log: silentLogger,
      registry: createRegistry({}, false),
    });
    try {
      const first = await Lines.open(pop3.port);
      await first.until(/^\+OK/);
      first.socket.write('USER carol\r\nPASS carol-pw\r\n');
      await gate.entered();
      // The client goes away (reset) while the login is still reading the maildrop.
      first.socket.resetAndDestroy();
      await waitFor(() => pop3.sessions() === 0 || undefined, 5000, 'the first session closed');
      gate.release();
      await new Promise((r) => setTimeout(r, 100));

      const second = await Lines.open(pop3.port);
      await second.until(/^\+OK/);
      second.socket.write('USER carol\r\nPASS carol-pw\r\n');
      const text = await second.until(/\r\n(\+OK|-ERR)[^\r]*\r\n(\+OK|-ERR)[^\r]*\r\n/);
      expect(text).not.toMatch(/IN-USE/);
      expect(text).toMatch(/\+OK Logged in/);
      second.socket.write('QUIT\r\n');
      await waitFor(() => second.closed || undefined, 5000, 'QUIT closed');
    } finally {
      await pop3.close(0);
    }
  });

  it('POP3 at maxSessions: a refused connection whose client never closes is closed within a bound, and close() does not wait for it', async () => {
    const pop3 = await startPop3Server({
      store: harness.store,
      host: '127.0.0.1',
      port: 0,
      masterUser: MASTER.user,
      masterSecret: MASTER.secret,
      trusted: new AddressList(['127.0.0.0/8']),
      log: silentLogger,
      registry: createRegistry({}, false),
      maxSessions: 1,
    });
    let closing: Promise<void> | null = null;
    const clients: Lines[] = [];
    try {
      const held = await Lines.open(pop3.port);
      await held.until(/^\+OK/);
      // Refused; the client reads the -ERR and keeps its side open.
      const lingering = new Lines(net.connect({ host: '127.0.0.1', port: pop3.port, allowHalfOpen: true }));
      clients.push(lingering);
      await lingering.until(/^-ERR \[SYS\/TEMP\] Too many connections/);
      // The server side is gone once a byte sent on this side is answered with a reset.
      await waitFor(
        () => {
          if (!lingering.closed) lingering.socket.write('NOOP\r\n');
          return lingering.closed || undefined;
        },
        6000,
        'the refused connection closed by the server',
        200,
      );
      held.socket.write('QUIT\r\n');
      await waitFor(() => held.closed || undefined, 5000, 'QUIT closed');
      // A second refused one still open when the server stops.
      const held2 = await Lines.open(pop3.port);
      await held2.until(/^\+OK/);
      const lingering2 = new Lines(net.connect({ host: '127.0.0.1', port: pop3.port, allowHalfOpen: true }));
      clients.push(lingering2);
      await lingering2.until(/^-ERR/);
      closing = pop3.close(0);
      let stopped = false;
      void closing.then(() => (stopped = true));
      await waitFor(() => stopped || undefined, 8000, 'close() resolved');
    } finally {
      // Without the bound the server never finishes closing while a refused client stays.
      for (const c of clients) c.socket.destroy();
      await Promise.race([closing ?? pop3.close(0), new Promise((r) => setTimeout(r, 3000))]);
    }
  });

  it('LMTP: connections that close before the greeting, or are refused at maxClients, leave the session count and gauge at zero', async () => {
    const registry = createRegistry({}, false);
    const lmtp = await startLmtpServer({ store: harness.store, host: '127.0.0.1', port: 0, log: silentLogger, registry, trusted: new AddressList(['127.0.0.0/8']), maxClients: 1 });
    const gaugeNow = async () => (await registry.getSingleMetric('pairgate_sessions')!.get()).values.find((v) => v.labels.protocol === 'lmtp')?.value ?? 0;
    try {
      // A TCP check: connect, close at once (before smtp-server's greeting delay has run).
      for (let i = 0; i < 3; i++) {
        const c = await Lines.open(lmtp.port);
        c.socket.destroy();
      }
      await new Promise((r) => setTimeout(r, 300));
      expect(lmtp.sessions()).toBe(0);
      expect(await gaugeNow()).toBe(0);

      // One session open; a second connection is refused at maxClients (421) and closes.
      const held = await Lines.open(lmtp.port);
      await held.until(/^220 /);
      expect(lmtp.sessions()).toBe(1);
      const refused = await Lines.open(lmtp.port);
      await refused.until(/^421 /);
      await waitFor(() => refused.closed || undefined, 5000, 'the refused connection closed');
      await new Promise((r) => setTimeout(r, 200));
      expect(lmtp.sessions()).toBe(1);
      expect(await gaugeNow()).toBe(1);

      held.socket.write('QUIT\r\n');
      await waitFor(() => held.closed || undefined, 5000, 'QUIT closed');
      await waitFor(() => lmtp.sessions() === 0 || undefined, 5000, 'the held session counted out');
      await new Promise((r) => setTimeout(r, 100));
      expect(lmtp.sessions()).toBe(0);
      expect(await gaugeNow()).toBe(0);
    } finally {
      await lmtp.close();
    }
  });
});
