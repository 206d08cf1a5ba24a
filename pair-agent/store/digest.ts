/** Content addresses of message bodies. */
import { createHash, webcrypto } from 'node:crypto';

/**
 * SHA-256 in hex. Large bodies are hashed on the libuv thread pool (WebCrypto), so that the event loop keeps
 * parsing other connections meanwhile; small ones inline, where the hand-off would cost more than the hash.
 */
export async function sha256Hex(data: Buffer): Promise<string> {
  if (data.length < 64 * 1024) return createHash('sha256').update(data).digest('hex');
  return Buffer.from(await webcrypto.subtle.digest('SHA-256', data)).toString('hex');
}
