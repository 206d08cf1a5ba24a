/**
 * The small set of error classes every role shares. Each has a stable `code` that logs,
 * metrics and protocol reply tables key on, and says where it is made whether it is
 * temporary (the client should retry: 4xx, [SYS/TEMP], NO [UNAVAILABLE]) or permanent.
 */
export type ErrorCode =
  | 'CONFIG_INVALID'
  | 'UNAVAILABLE'
  | 'TIMEOUT'
  | 'NOT_FOUND'
  | 'AUTH_FAILED'
  | 'CONFLICT'
  | 'LIMIT'
  | 'INTEGRITY'
  | 'PROTOCOL'
  | 'BAD_INPUT';

export interface PairgateErrorOptions {
  cause?: unknown;
  /** Extra fields for the log line (never secrets). */
  details?: Record<string, unknown>;
}

export class PairgateError extends Error {
  readonly code: ErrorCode;
  readonly temporary: boolean;
  readonly details: Record<string, unknown>;

  constructor(code: ErrorCode, message: string, temporary: boolean, options: PairgateErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.code = code;
    this.temporary = temporary;
    this.details = options.details ?? {};
  }
}

/** A configuration file or value that cannot be used; `key` names the offending path. */
export class ConfigError extends PairgateError {
  readonly key: string;
  constructor(key: string, message: string, options?: PairgateErrorOptions) {
    super('CONFIG_INVALID', key ? `${key}: ${message}` : message, false, options);
    this.key = key;
  }
}

/** A dependency (LDAP, Redis, a pair, a peer) cannot be reached now; retrying later may work. */
export class UnavailableError extends PairgateError {
  constructor(message: string, options?: PairgateErrorOptions) {
    super('UNAVAILABLE', message, true, options);
  }
}

/** A network wait ran past its bound. Always temporary. */
export class TimeoutError extends PairgateError {
  constructor(message: string, options?: PairgateErrorOptions) {
    super('TIMEOUT', message, true, options);
  }
}

/** The thing asked for does not exist (unknown user, unknown pair). Permanent. */
export class NotFoundError extends PairgateError {
  constructor(message: string, options?: PairgateErrorOptions) {
    super('NOT_FOUND', message, false, options);
  }
}

/** Credentials were checked and refused. */
export class AuthError extends PairgateError {
  constructor(message: string, options?: PairgateErrorOptions) {
    super('AUTH_FAILED', message, false, options);
  }
}

/** The request contradicts current state (second primary, mailbox in use, split brain). */
export class ConflictError extends PairgateError {
  constructor(message: string, options?: PairgateErrorOptions & { temporary?: boolean }) {
    super('CONFLICT', message, options?.temporary ?? false, options);
  }
}

/** A size, quota or rate limit was reached. */
export class LimitError extends PairgateError {
  constructor(message: string, options?: PairgateErrorOptions & { temporary?: boolean }) {
    super('LIMIT', message, options?.temporary ?? false, options);
  }
}

/** Stored data failed a checksum or structural check. Never served. */
export class IntegrityError extends PairgateError {
  constructor(message: string, options?: PairgateErrorOptions) {
    super('INTEGRITY', message, false, options);
  }
}

/** A peer spoke the wire protocol wrongly (bad frame, bad HMAC, bad command). */
export class ProtocolError extends PairgateError {
  constructor(message: string, options?: PairgateErrorOptions) {
    super('PROTOCOL', message, false, options);
  }
}

/** Caller input that can never succeed as given (unaligned write, bad address). */
export class BadInputError extends PairgateError {
  constructor(message: string, options?: PairgateErrorOptions) {
    super('BAD_INPUT', message, false, options);
  }
}

export function isTemporary(err: unknown): boolean {
  return err instanceof PairgateError ? err.temporary : true;
}

export function errorCode(err: unknown): string {
  if (err instanceof PairgateError) return err.code;
  if (err && typeof err === 'object' && 'code' in err && typeof err.code === 'string') return err.code;
  return 'INTERNAL';
}
