/**
 * An HTTP power switch: `POST <url>` with `{"action":"off"|"reboot"}` and a bearer token; a 2xx
 * answer means the switch did it. With `confirm`, the agent then polls `GET <url>` until it says
 * `{"state":"off"}` (or the timeout passes). The URL is the peer's outlet.
 */
import type { FenceDevice, FenceOutcome } from './types.ts';

export interface HttpFenceOptions {
  url: string;
  token?: string | undefined;
  timeoutMs: number;
  confirm: boolean;
}

export class HttpFenceDevice implements FenceDevice {
  readonly kind = 'http';
  constructor(private readonly opts: HttpFenceOptions) {}

  private headers(): Record<string, string> {
    return { 'content-type': 'application/json', ...(this.opts.token ? { authorization: `Bearer ${this.opts.token}` } : {}) };
  }

  async fence(action: 'off' | 'reboot', signal: AbortSignal): Promise<FenceOutcome> {
    const deadline = Date.now() + this.opts.timeoutMs;
    const bounded = () => AbortSignal.any([signal, AbortSignal.timeout(Math.max(1, deadline - Date.now()))]);
    try {
      const res = await fetch(this.opts.url, { method: 'POST', headers: this.headers(), body: JSON.stringify({ action }), signal: bounded() });
      await res.arrayBuffer();
      if (!res.ok) return { outcome: 'failed', detail: `power switch answered ${res.status} to ${action}` };
      if (action === 'off' && this.opts.confirm) {
        while (Date.now() < deadline) {
          const s = await fetch(this.opts.url, { headers: this.headers(), signal: bounded() });
          const body = (await s.json().catch(() => null)) as { state?: unknown } | null;
          if (s.ok && body?.state === 'off') return { outcome: 'ok', detail: 'power switch confirms off' };
          await new Promise((r) => setTimeout(r, 100));
        }
        return { outcome: 'timeout', detail: 'power switch never confirmed off' };
      }
      return { outcome: 'ok', detail: `power switch did ${action}` };
    } catch (err) {
      const e = err as Error;
      if (e.name === 'TimeoutError' || e.name === 'AbortError') return { outcome: 'timeout', detail: `power switch did not answer within ${this.opts.timeoutMs} ms` };
      return { outcome: 'error', detail: `power switch: ${e.message}` };
    }
  }
}
