/**
 * The admin HTTP listener every long-running role has: `/metrics` (Prometheus text),
 * `/health` (JSON, 200 when healthy, 503 otherwise) and the role's own admin routes.
 *
 * State-changing calls (POST) need the configured bearer token; with no token configured
 * they are accepted from loopback only, so a lab works without setup and a production
 * node is not steerable from the network by accident.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { timingSafeEqual } from 'node:crypto';
import type { Registry } from 'prom-client';
import type { Logger } from './log.ts';
import { normalizeAddress } from './cidr.ts';
import { PairgateError } from './errors.ts';

export interface HealthAnswer {
  healthy: boolean;
  body: unknown;
}

export type AdminRoute = (req: { body: unknown; query: URLSearchParams }) => Promise<unknown> | unknown;

export interface AdminServerOptions {
  host: string;
  port: number;
  registry: Registry;
  health: () => Promise<HealthAnswer> | HealthAnswer;
  /** `GET /path` and `POST /path` handlers, keyed as `"GET /status"` or `"POST /standby"`. */
  routes?: Record<string, AdminRoute>;
  token?: string | undefined;
  log: Logger;
}

export interface AdminServer {
  server: http.Server;
  address: AddressInfo;
  url: string;
  close(): Promise<void>;
}

const MAX_BODY = 64 * 1024;

function isLoopback(addr: string | undefined): boolean {
  const a = normalizeAddress(addr ?? '');
  return a === '::1' || a.startsWith('127.');
}

function tokenMatches(header: string | undefined, token: string): boolean {
  const given = Buffer.from(header?.replace(/^Bearer\s+/i, '') ?? '');
  const want = Buffer.from(token);
  return given.length === want.length && timingSafeEqual(given, want);
}

function send(res: http.ServerResponse, status: number, body: unknown, type = 'application/json'): void {
  const text = type === 'application/json' ? JSON.stringify(body) : String(body);
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' });
  res.end(text);
}

async function readBody(req: http.IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > MAX_BODY) throw new PairgateError('BAD_INPUT', 'request body too large', false);
    chunks.push(chunk as Buffer);
  }
  if (size === 0) return {};
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch {
    throw new PairgateError('BAD_INPUT', 'request body is not JSON', false);
  }
}

export async function startAdminServer(opts: AdminServerOptions): Promise<AdminServer> {
  const routes = opts.routes ?? {};
  const server = http.createServer(async (req, res) => {
    const url = new URL(req.url ?? '/', 'http://admin');
    const method = req.method ?? 'GET';
    try {
      if (method === 'GET' && url.pathname === '/metrics') {
        send(res, 200, await opts.registry.metrics(), opts.registry.contentType);
        return;
      }
      if (method === 'GET' && url.pathname === '/health') {
        const h = await opts.health();
        send(res, h.healthy ? 200 : 503, h.body);
        return;
      }
      const route = routes[`${method} ${url.pathname}`];
      if (!route) {
        send(res, 404, { error: 'NOT_FOUND', message: `no route ${method} ${url.pathname}` });
        return;
      }
      if (method !== 'GET') {
        const allowed = opts.token ? tokenMatches(req.headers.authorization, opts.token) : isLoopback(req.socket.remoteAddress);
        if (!allowed) {
          opts.log.warn({ path: url.pathname, from: req.socket.remoteAddress }, 'admin call refused');
          send(res, 403, { error: 'FORBIDDEN', message: opts.token ? 'bad or missing bearer token' : 'admin calls only from loopback' });
          return;
        }
      }
      const body = method === 'GET' ? {} : await readBody(req);
      const result = await route({ body, query: url.searchParams });
      send(res, 200, result ?? { ok: true });
    } catch (err) {
      const e = err instanceof PairgateError ? err : null;
      const status = e ? (e.code === 'BAD_INPUT' || e.code === 'CONFLICT' ? 409 : e.code === 'NOT_FOUND' ? 404 : e.temporary ? 503 : 400) : 500;
      if (!e) opts.log.error({ err, path: url.pathname }, 'admin route failed');
      send(res, status, { error: e?.code ?? 'INTERNAL', message: (err as Error).message });
    }
  });
  server.keepAliveTimeout = 5000;
  server.requestTimeout = 10_000;
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port, opts.host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const address = server.address() as AddressInfo;
  const host = address.family === 'IPv6' ? `[${address.address}]` : address.address;
  return {
    server,
    address,
    url: `http://${host}:${address.port}`,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}

/** Client side of the admin API, for the CLI (`pairgate pair standby`, `pairgate lb drain`). */
export async function adminCall(
  baseUrl: string,
  method: 'GET' | 'POST',
  path: string,
  body?: unknown,
  opts: { token?: string | undefined; timeoutMs?: number } = {},
): Promise<{ status: number; body: unknown }> {
  const res = await fetch(new URL(path, baseUrl), {
    method,
    headers: {
      'content-type': 'application/json',
      ...(opts.token ? { authorization: `Bearer ${opts.token}` } : {}),
    },
    ...(method === 'POST' ? { body: JSON.stringify(body ?? {}) } : {}),
    signal: AbortSignal.timeout(opts.timeoutMs ?? 5000),
  });
  const text = await res.text();
  let parsed: unknown = text;
  try {
    parsed = JSON.parse(text);
  } catch {
    // /metrics and other text answers stay as text
  }
  return { status: res.status, body: parsed };
}
