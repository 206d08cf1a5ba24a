/**
 * A session's logger whose pino child is made only when a line is actually written. Making a
 * child per connection (bindings through the redacting formatter, pino's chindings string) was
 * a measurable share of the proxy's CPU per session, and at the usual levels a session that
 * logs in and out cleanly writes few lines or none. Lines carry the same fields as a child made
 * up front would give them; the level is the parent's at the time of the call.
 */
import type { LogFn } from 'pino';
import type { Logger } from '../common/log.ts';

type Level = 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace';
type Bindings = Record<string, unknown>;

/** The part of a pino Logger that sessions and the login use. */
export interface SessionLog {
  fatal: LogFn;
  error: LogFn;
  warn: LogFn;
  info: LogFn;
  debug: LogFn;
  trace: LogFn;
  isLevelEnabled(level: string): boolean;
  /** A lazy logger with more bindings (this one's first). */
  with(more: Bindings): SessionLog;
}

function method(level: Level): LogFn {
  return function (this: LazyLog, ...args: unknown[]) {
    if (!this.parent.isLevelEnabled(level)) return;
    (this.logger()[level] as (...a: unknown[]) => void)(...args);
  } as LogFn;
}

export class LazyLog implements SessionLog {
  private made: Logger | null = null;

  /** `bindings` is called once, when the first enabled line is written. */
  constructor(
    readonly parent: Logger,
    private readonly bindings: () => Bindings,
  ) {}

  /** The pino child (made now if it was not yet). */
  logger(): Logger {
    return (this.made ??= this.parent.child(this.bindings()));
  }

  isLevelEnabled(level: string): boolean {
    return this.parent.isLevelEnabled(level);
  }

  with(more: Bindings): SessionLog {
    const first = this.bindings;
    return new LazyLog(this.parent, () => ({ ...first(), ...more }));
  }

  declare fatal: LogFn;
  declare error: LogFn;
  declare warn: LogFn;
  declare info: LogFn;
  declare debug: LogFn;
  declare trace: LogFn;
}

for (const level of ['fatal', 'error', 'warn', 'info', 'debug', 'trace'] as const) {
  Object.defineProperty(LazyLog.prototype, level, { value: method(level), writable: true, configurable: true });
}
