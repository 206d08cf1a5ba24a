/** Open connections per client address, for a listener's per-address limit (0 = no limit). */
export class AddressSlots {
  private readonly open = new Map<string, number>();

  constructor(private readonly max: number) {}

  /** Counts a connection from `address`; null when the address is at its limit, else how many it now has. */
  take(address: string): number | null {
    const n = this.open.get(address) ?? 0;
    if (this.max > 0 && n >= this.max) return null;
    this.open.set(address, n + 1);
    return n + 1;
  }

  /** Counts one of `address`'s connections out. */
  give(address: string): void {
    const left = (this.open.get(address) ?? 1) - 1;
    if (left <= 0) this.open.delete(address);
    else this.open.set(address, left);
  }

  count(address: string): number {
    return this.open.get(address) ?? 0;
  }
}
