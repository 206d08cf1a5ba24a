/**
 * The one table from store errors to IMAP replies (RFC 5530 response codes). Temporary errors
 * (store unavailable, failover in progress) become NO [UNAVAILABLE] so clients retry.
 */
import { PairgateError } from '../../../common/errors.ts';
import type { Reply } from './state.ts';

const CODE_BY_ERROR: Record<string, string> = {
  NOT_FOUND: 'NONEXISTENT',
  LIMIT: 'OVERQUOTA',
  UNAVAILABLE: 'UNAVAILABLE',
  TIMEOUT: 'UNAVAILABLE',
  INTEGRITY: 'CORRUPTION',
  BAD_INPUT: 'CANNOT',
  AUTH_FAILED: 'AUTHENTICATIONFAILED',
};

export function replyForError(err: unknown): { reply: Reply; internal: boolean } {
  if (err instanceof PairgateError) {
    let code = CODE_BY_ERROR[err.code];
    if (err.code === 'CONFLICT') code = /exist/i.test(err.message) ? 'ALREADYEXISTS' : 'INUSE';
    if (err.code === 'LIMIT' && err.temporary) code = 'LIMIT';
    if (code) return { reply: { status: 'NO', code, text: err.message }, internal: false };
  }
  return { reply: { status: 'NO', code: 'SERVERBUG', text: 'Internal error occurred. Refer to server log for more information.' }, internal: true };
}
