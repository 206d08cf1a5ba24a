/** Small network probes shared by resources and ping targets. */
import { execFile } from 'node:child_process';
import net from 'node:net';

export function canConnectOnce(host: string, port: number, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = net.connect({ host, port });
    const done = (ok: boolean) => {
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(timeoutMs, () => done(false));
    sock.once('connect', () => done(true));
    sock.once('error', () => done(false));
  });
}

/** A ping target: `host:port` is probed with a TCP connect, a bare host with one ICMP echo (`ping -c1`). */
export function probeTarget(target: string, timeoutMs: number): Promise<boolean> {
  const m = /^\[?([^\]]+?)\]?:(\d{1,5})$/.exec(target);
  if (m) return canConnectOnce(m[1]!, Number(m[2]), timeoutMs);
  return new Promise((resolve) => {
    execFile('ping', ['-c', '1', '-W', String(Math.max(1, Math.ceil(timeoutMs / 1000))), target], { timeout: timeoutMs + 500 }, (err) => resolve(!err));
  });
}
