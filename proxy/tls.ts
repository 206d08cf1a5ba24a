/**
 * Certificates for the TLS listeners: read once at start, re-read on SIGHUP (`reload`). A
 * reload that fails (missing file, key not matching) keeps the old context and says why;
 * sessions already open keep theirs, new handshakes use the new one.
 */
import { readFileSync } from 'node:fs';
import tls from 'node:tls';
import type { Socket } from 'node:net';
import { ConfigError, TimeoutError, ProtocolError } from '../common/errors.ts';
import type { TlsFiles } from '../common/config.ts';

export class TlsStore {
  private ctx: tls.SecureContext;
  loadedAt = Date.now();

  constructor(private files: TlsFiles) {
    this.ctx = TlsStore.load(files);
  }

  static load(files: TlsFiles): tls.SecureContext {
    try {
      return tls.createSecureContext({
        cert: readFileSync(files.cert),
        key: readFileSync(files.key),
        ...(files.ca ? { ca: readFileSync(files.ca) } : {}),
        minVersion: 'TLSv1.2',
      });
    } catch (err) {
      throw new ConfigError('tls', `cannot load certificate ${files.cert} / key ${files.key}: ${(err as Error).message}`);
    }
  }

  get context(): tls.SecureContext {
    return this.ctx;
  }

  /** Re-reads the files (optionally new paths). Throws ConfigError and keeps the old context on failure. */
  reload(files: TlsFiles = this.files): void {
    const next = TlsStore.load(files);
    this.ctx = next;
    this.files = files;
    this.loadedAt = Date.now();
  }
}

/** Runs the server side of a TLS handshake on an accepted socket, bounded in time. */
export function upgradeToTls(socket: Socket, store: TlsStore, timeoutMs: number): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const secure = new tls.TLSSocket(socket, { isServer: true, secureContext: store.context });
    const done = (err: Error | null) => {
      clearTimeout(timer);
      secure.off('secure', onSecure);
      secure.off('error', onError);
      secure.off('close', onClose);
      if (err) {
        secure.destroy();
        reject(err);
      } else resolve(secure);
    };
    const onSecure = () => done(null);
    const onError = (err: Error) => done(new ProtocolError(`TLS handshake failed: ${err.message}`));
    const onClose = () => done(new ProtocolError('connection closed during the TLS handshake'));
    const timer = setTimeout(() => done(new TimeoutError(`TLS handshake not done within ${timeoutMs} ms`)), timeoutMs);
    secure.once('secure', onSecure);
    secure.once('error', onError);
    secure.once('close', onClose);
  });
}
