/** Polling with a bound, for the lab and the operator commands. */
export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Polls `check` every intervalMs until it is truthy; resolves false when timeoutMs passes. */
export async function waitUntil(check: () => unknown | Promise<unknown>, timeoutMs: number, intervalMs = 50): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      if (await check()) return true;
    } catch {
      // not yet
    }
    if (Date.now() >= deadline) return false;
    await sleep(intervalMs);
  }
}
