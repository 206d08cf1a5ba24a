/**
 * The pair's health endpoint on the floating address (`GET http://<floating>:<admin>/health`),
 * served by the active node only: started after the floating IP, stopped before it. In loopback
 * mode this listener is also what proves the node holds the address: a second node cannot bind
 * the same address and port while the first still listens.
 */
import { startAdminServer, type AdminServer, type HealthAnswer } from '../../common/admin-http.ts';
import { PairgateError } from '../../common/errors.ts';
import type { Logger } from '../../common/log.ts';
import type { MetricsRegistry } from '../../common/metrics.ts';
import type { MonitorResult, Resource } from '../resource.ts';
import { canConnectOnce } from './probe.ts';

export class HealthEndpointResource implements Resource {
  readonly name = 'health-endpoint';
  private server: AdminServer | null = null;

  constructor(
    private readonly host: string,
    private readonly port: number,
    private readonly health: () => HealthAnswer,
    private readonly registry: MetricsRegistry,
    private readonly log: Logger,
  ) {}

  async start(): Promise<void> {
    if (this.server) return;
    // Bind retries for a short while: a fenced peer's socket may take a moment to go away.
    const deadline = Date.now() + 2000;
    for (;;) {
      try {
        this.server = await startAdminServer({ host: this.host, port: this.port, registry: this.registry, health: this.health, log: this.log });
        return;
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code !== 'EADDRINUSE' || Date.now() > deadline) {
          throw new PairgateError('UNAVAILABLE', `cannot serve health on ${this.host}:${this.port}: ${code ?? (err as Error).message}`, true);
        }
        await new Promise((r) => setTimeout(r, 50));
      }
    }
  }

  async stop(): Promise<void> {
    const s = this.server;
    this.server = null;
    await s?.close();
  }

  async monitor(): Promise<MonitorResult> {
    if (!this.server) return 'stopped';
    return (await canConnectOnce(this.host, this.port, 1000)) ? 'running' : 'failed';
  }
}
