/**
 * Shared by the IMAP and POP3 servers' close(): waits until every session has ended or `ms`
 * has passed, polling (sessions end on their own socket events, which this cannot await).
 */
export async function untilNoSessions(sessions: { readonly size: number }, ms: number): Promise<void> {
  const deadline = Date.now() + ms;
  while (sessions.size && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
}
