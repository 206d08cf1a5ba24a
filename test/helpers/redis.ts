/** A private redis-server on an ephemeral loopback port, for tests and the lab. */
import { startProcess, tempDir, type Managed } from './proc.ts';
import { freePort, waitForPort } from './net.ts';

export interface RedisServer {
  host: string;
  port: number;
  url: string;
  proc: Managed;
  /** Stops the server (simulating an outage); `start()` brings it back on the same port. */
  stop(): Promise<void>;
  start(): Promise<void>;
  close(): Promise<void>;
}

export async function startRedis(): Promise<RedisServer> {
  const dir = tempDir('pairgate-redis-');
  const host = '127.0.0.1';
  const port = await freePort();
  const launch = async () => {
    const proc = startProcess('redis-server', 'redis-server', [
      '--bind', host, '--port', String(port), '--save', '', '--appendonly', 'no', '--dir', dir.path, '--daemonize', 'no',
    ]);
    await waitForPort(host, port, 10_000, proc.alive).catch((err) => {
      throw new Error(`${err.message}\n${proc.output()}`);
    });
    return proc;
  };
  const server: RedisServer = {
    host,
    port,
    url: `redis://${host}:${port}`,
    proc: await launch(),
    stop: async () => server.proc.stop(),
    start: async () => {
      server.proc = await launch();
    },
    close: async () => {
      await server.proc.stop();
      dir.cleanup();
    },
  };
  return server;
}
