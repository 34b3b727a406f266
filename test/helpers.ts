// Shared test helpers: seeded random data, per-level loops, error norms and finite differences.
import { setSimdLevel, simdLevels, type SimdLevel } from '../lib/index.js';

/** Deterministic PRNG (mulberry32). */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Float32Array of n uniform values in [lo, hi). */
export function randn(n: number, seed: number, lo = -1, hi = 1): Float32Array {
  const r = rng(seed);
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = lo + (hi - lo) * r();
  return a;
}

/** Int32Array of n ids in [0, V). */
export function randIds(n: number, V: number, seed: number): Int32Array {
  const r = rng(seed);
  const a = new Int32Array(n);
  for (let i = 0; i < n; i++) a[i] = Math.floor(r() * V);
  return a;
}

/** The fast levels this CPU can run (everything but 'reference'). BTS_TEST_LEVELS=avx2,scalar narrows it. */
export function fastLevels(): SimdLevel[] {
  const all = simdLevels().filter((l) => l !== 'reference');
  const only = process.env.BTS_TEST_LEVELS?.split(',');
  return only ? all.filter((l) => only.includes(l)) : all;
}

/** Runs fn at `level`, restoring the best level afterwards. */
export function atLevel<T>(level: SimdLevel, fn: () => T): T {
  setSimdLevel(level);
  try {
    return fn();
  } finally {
    const levels = simdLevels();
    setSimdLevel(levels[levels.length - 1]);
  }
}

/** Async form of {@link atLevel}: runs `fn` at `level` and restores the best level when it settles. */
export async function atLevelAsync<T>(level: SimdLevel, fn: () => Promise<T>): Promise<T> {
  setSimdLevel(level);
  try {
    return await fn();
  } finally {
    const levels = simdLevels();
    setSimdLevel(levels[levels.length - 1]);
  }
}

/**
 * max |a-b| / max(max |b|, floor): error relative to the reference's scale. `floor` keeps outputs that
 * are ~0 by cancellation (e.g. RMSNorm's dx at D = 1) from turning rounding into a large ratio.
 */
export function relErr(a: ArrayLike<number>, b: ArrayLike<number>, floor = 1e-30): number {
  if (a.length !== b.length) throw new Error(`length mismatch ${a.length} vs ${b.length}`);
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    num = Math.max(num, Math.abs(a[i] - b[i]));
    den = Math.max(den, Math.abs(b[i]));
  }
  return num / Math.max(den, floor);
}

/** Every element finite. */
export function allFinite(a: ArrayLike<number>): boolean {
  for (let i = 0; i < a.length; i++) if (!Number.isFinite(a[i])) return false;
  return true;
}

/**
 * Central finite differences of a scalar function of `x` at `count` random coordinates, against the
 * analytic gradient `grad`. f must read x each call. Returns the worst relative error, measured
 * against max(|numeric|, |analytic|, floor) per coordinate.
 */
export function checkGrad(
  f: () => number,
  x: Float32Array,
  grad: ArrayLike<number>,
  opts: { eps?: number; count?: number; seed?: number; floor?: number } = {},
): number {
  const eps = opts.eps ?? 1e-2;
  const count = Math.min(opts.count ?? 24, x.length);
  const r = rng(opts.seed ?? 7);
  let scale = 0;
  for (let i = 0; i < grad.length; i++) scale = Math.max(scale, Math.abs(grad[i]));
  const floor = opts.floor ?? 1e-2 * scale + 1e-6;
  let worst = 0;
  for (let c = 0; c < count; c++) {
    const i = Math.floor(r() * x.length);
    const old = x[i];
    x[i] = old + eps;
    const fp = f();
    x[i] = old - eps;
    const fm = f();
    x[i] = old;
    const numeric = (fp - fm) / (2 * eps);
    const err = Math.abs(numeric - grad[i]) / Math.max(Math.abs(numeric), Math.abs(grad[i]), floor);
    worst = Math.max(worst, err);
  }
  return worst;
}

/** sum(a * w) in double. */
export function dot(a: ArrayLike<number>, w: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * w[i];
  return s;
}
