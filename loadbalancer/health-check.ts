/**
 * One active check of a backend: a TCP connect (with a PROXY v2 LOCAL header when the pool
 * speaks v2, so the proxy sees a health check rather than a broken client) or, when the backend
 * has a `healthUrl`, an HTTP GET of the proxy's `/health` (2xx = good). Bounded by `timeoutMs`.
 */
import net from 'node:net';
import http from 'node:http';
import { buildLocalHeader } from './proxy-header.ts';

export type CheckResult = 'ok' | 'fail' | 'timeout';

const LOCAL = buildLocalHeader();

export function tcpCheck(host: string, port: number, timeoutMs: number, sendLocalHeader: boolean): Promise<CheckResult> {
  return new Promise((resolve) => {
    let done = false;
    const sock = net.connect({ host, port });
    const finish = (r: CheckResult) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      sock.destroy();
      resolve(r);
    };
    const timer = setTimeout(() => finish('timeout'), timeoutMs);
    sock.once('connect', () => {
      if (sendLocalHeader) sock.write(LOCAL);
      // Close politely: a FIN, not a reset, so the backend logs nothing alarming.
      sock.end();
      finish('ok');
    });
    sock.once('error', () => finish('fail'));
  });
}

export function httpCheck(url: string, timeoutMs: number): Promise<CheckResult> {
  return new Promise((resolve) => {
    let done = false;
    const finish = (r: CheckResult) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      req.destroy();
      resolve(r);
    };
    const timer = setTimeout(() => finish('timeout'), timeoutMs);
    const req = http.get(url, { agent: false, headers: { 'user-agent': 'pairgate-lb-check', connection: 'close' } }, (res) => {
      const ok = (res.statusCode ?? 0) >= 200 && (res.statusCode ?? 0) < 300;
      res.resume();
      finish(ok ? 'ok' : 'fail');
    });
    req.once('error', () => finish('fail'));
  });
}
