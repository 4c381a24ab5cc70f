// Allocation tracking while a target runs: Buffer.alloc / allocUnsafe / allocUnsafeSlow / concat
// and the typed-array and ArrayBuffer constructors (looked up as globals at call time, so module
// code picks the wrappers up) report each size requested. A parser that sizes an allocation from a
// header field shows up as one request far larger than its input, even when the request fails.
// Only this thread is watched (the zstd worker pool allocates in its own threads).

type Patch = () => void;

let largest = 0;
let largestWhat = '';
let total = 0;
let active = false;
const restores: Patch[] = [];

function record(bytes: number, what: string): void {
  if (!active || !Number.isFinite(bytes)) return;
  total += Math.max(0, bytes);
  if (bytes > largest) {
    largest = bytes;
    largestWhat = what;
  }
}

function patchBuffer(): void {
  const B = Buffer as unknown as Record<string, (...a: unknown[]) => Buffer>;
  for (const name of ['alloc', 'allocUnsafe', 'allocUnsafeSlow'] as const) {
    const orig = B[name]!;
    B[name] = function (this: unknown, ...a: unknown[]) {
      record(Number(a[0]), `Buffer.${name}(${String(a[0])})`);
      return orig.apply(this, a);
    };
    restores.push(() => { B[name] = orig; });
  }
  const origConcat = B['concat']!;
  B['concat'] = function (this: unknown, ...a: unknown[]) {
    const list = a[0] as readonly Uint8Array[];
    const n = (a[1] as number | undefined) ?? list.reduce((s, x) => s + x.length, 0);
    record(n, `Buffer.concat(${n})`);
    return origConcat.apply(this, a);
  };
  restores.push(() => { B['concat'] = origConcat; });
}

const TYPED = ['ArrayBuffer', 'Uint8Array', 'Uint16Array', 'Uint32Array', 'Int32Array', 'Float32Array', 'Float64Array', 'BigUint64Array', 'BigInt64Array'] as const;

function patchTyped(): void {
  const g = globalThis as unknown as Record<string, unknown>;
  for (const name of TYPED) {
    const Orig = g[name] as { new (...a: unknown[]): object; BYTES_PER_ELEMENT?: number };
    const per = Orig.BYTES_PER_ELEMENT ?? 1;
    const Wrapped = class extends (Orig as new (...a: unknown[]) => object) {
      constructor(...a: unknown[]) {
        if (typeof a[0] === 'number') record(a[0] * per, `new ${name}(${a[0]})`);
        super(...a);
      }
      static override [Symbol.hasInstance](x: unknown): boolean {
        return x instanceof Orig;
      }
    };
    Object.defineProperty(Wrapped, 'name', { value: name });
    g[name] = Wrapped;
    restores.push(() => { g[name] = Orig; });
  }
}

/** Starts watching; stop() ends it and returns the largest single request and the total. */
export function startAllocGuard(): void {
  largest = 0;
  largestWhat = '';
  total = 0;
  if (restores.length === 0) {
    patchBuffer();
    patchTyped();
  }
  active = true;
}

export function stopAllocGuard(): { largest: number; what: string; total: number } {
  active = false;
  return { largest, what: largestWhat, total };
}

/** Removes the wrappers (the guard patches once and stays installed otherwise). */
export function uninstallAllocGuard(): void {
  active = false;
  while (restores.length) restores.pop()!();
}
