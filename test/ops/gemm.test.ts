import { describe, expect, it } from 'vitest';
import { ops, info, setThreads, ArgumentError, DTypeError, ShapeError } from '../../lib/index.js';
import { allFinite, atLevel, fastLevels, randn, relErr, rng } from '../helpers.js';

// One GEMM case: shapes, layout, strides (extra elements per row beyond the minimum), scalars.
interface Case {
  m: number;
  n: number;
  k: number;
  transA: boolean;
  transB: boolean;
  pad: number;
  alpha: number;
  beta: number;
}

// Operands of a case, with padded rows; the padding holds garbage the kernels must not use.
function operands(cs: Case, seed: number) {
  const { m, n, k, transA, transB, pad } = cs;
  const [aRows, aCols] = transA ? [k, m] : [m, k];
  const [bRows, bCols] = transB ? [n, k] : [k, n];
  const lda = aCols + pad, ldb = bCols + pad, ldc = n + pad;
  const a = randn(Math.max(0, (aRows - 1) * lda + aCols), seed);
  const b = randn(Math.max(0, (bRows - 1) * ldb + bCols), seed + 1);
  const c0 = randn(Math.max(0, (m - 1) * ldc + n), seed + 2);
  if (cs.beta === 0) c0.fill(NaN);
  return { a, b, c0, lda, ldb, ldc };
}

function run(cs: Case, seed: number) {
  const o = operands(cs, seed);
  const c = o.c0.slice();
  ops.gemm({ ...cs, a: o.a, b: o.b, c, lda: o.lda, ldb: o.ldb, ldc: o.ldc });
  return c;
}

// Only the used elements of C (rows of n at stride ldc) compared; the row padding must be untouched.
function usedPart(c: Float32Array, m: number, n: number, ldc: number): Float32Array {
  const out = new Float32Array(m * n);
  for (let i = 0; i < m; i++) out.set(c.subarray(i * ldc, i * ldc + n), i * n);
  return out;
}

const dims = [1, 2, 3, 7, 17, 33, 65, 129, 300];

// A deterministic spread of shape mixtures over dims x layouts x strides x scalars.
function cases(count: number, seed: number): Case[] {
  const r = rng(seed);
  const pick = <T>(xs: T[]) => xs[Math.floor(r() * xs.length)];
  const out: Case[] = [];
  for (let i = 0; i < count; i++)
    out.push({
      m: pick(dims),
      n: pick(dims),
      k: pick(dims),
      transA: (i & 1) === 1,
      transB: (i & 2) === 2,
      pad: pick([0, 0, 3]),
      alpha: pick([1, 1, -0.75]),
      beta: pick([0, 1, 0.5]),
    });
  return out;
}

describe('gemm', () => {
  it('reference matches a direct JS triple loop', () => {
    const [m, n, k] = [3, 4, 5];
    for (const transA of [false, true])
      for (const transB of [false, true]) {
        const a = randn(m * k, 1);
        const b = randn(k * n, 2);
        const c0 = randn(m * n, 3);
        const c = atLevel('reference', () => ops.gemm({ a, b, c: c0.slice(), m, n, k, transA, transB, alpha: 0.5, beta: 2 }));
        for (let i = 0; i < m; i++)
          for (let j = 0; j < n; j++) {
            let s = 0;
            for (let p = 0; p < k; p++) s += (transA ? a[p * m + i] : a[i * k + p]) * (transB ? b[j * k + p] : b[p * n + j]);
            expect(c[i * n + j]).toBeCloseTo(0.5 * s + 2 * c0[i * n + j], 5);
          }
      }
  });

  for (const level of fastLevels()) {
    // fp32 sums of up to 300 terms in a different order than the double reference: ~1e-6 relative.
    it(`matches the reference at ${level} over shapes, layouts, strides, alpha, beta`, () => {
      const all = cases(96, 42);
      // Every small dim against every layout at least once, and the N- and K-edge mixtures.
      for (const d of dims)
        for (let l = 0; l < 4; l++)
          all.push({ m: d, n: 300 - d, k: d + 4, transA: (l & 1) === 1, transB: (l & 2) === 2, pad: 1, alpha: 1.5, beta: 0.5 });
      for (const [idx, cs] of all.entries()) {
        const o = operands(cs, idx * 7 + 1);
        const ref = atLevel('reference', () => run(cs, idx * 7 + 1));
        const got = atLevel(level, () => run(cs, idx * 7 + 1));
        const what = `${JSON.stringify(cs)}`;
        expect(allFinite(usedPart(got, cs.m, cs.n, o.ldc)), what).toBe(true);
        expect(relErr(usedPart(got, cs.m, cs.n, o.ldc), usedPart(ref, cs.m, cs.n, o.ldc)), what).toBeLessThan(1e-5);
        // Row padding of C (between n and ldc) is never written.
        for (let i = 0; i + 1 < cs.m; i++)
          for (let j = cs.n; j < o.ldc; j++) expect(Object.is(got[i * o.ldc + j], o.c0[i * o.ldc + j]), what).toBe(true);
      }
    });

    // Large enough for several KC steps (k > 256), several MC blocks, an NR edge and both threads.
    it(`large shapes exercise every blocking level and both threads at ${level}`, () => {
      for (const [m, n, k, transA, transB] of [
        [300, 700, 520, false, true],
        [300, 700, 520, false, false],
        [300, 700, 520, true, false],
        [130, 67, 1100, true, true],
        [5, 700, 520, false, true],
        [5, 700, 520, true, false],
        [3, 600, 520, false, false], // small M, B over 1 MiB: the streaming path
        [3, 600, 520, true, false],
      ] as [number, number, number, boolean, boolean][]) {
        const cs = { m, n, k, transA, transB, pad: 0, alpha: 1, beta: 0.5 };
        const ref = atLevel('reference', () => run(cs, m + n));
        const got = atLevel(level, () => run(cs, m + n));
        // 1100-term fp32 sums against double: 2e-5 relative to the output scale.
        expect(relErr(got, ref), JSON.stringify(cs)).toBeLessThan(2e-5);
        if (info().threads > 1) {
          const t = info().threads;
          setThreads(1);
          try {
            const one = atLevel(level, () => run(cs, m + n));
            // Same blocking, same k order per element: bitwise equal whatever the thread count.
            expect(Array.from(one)).toEqual(Array.from(got));
          } finally {
            setThreads(t);
          }
        }
      }
    });
  }

  it('beta = 0 never reads C: NaN-filled C gives no NaN', () => {
    for (const level of ['reference' as const, ...fastLevels()])
      for (const [m, n, k] of [
        [1, 688, 256],
        [7, 33, 17],
        [64, 100, 300],
      ]) {
        const a = randn(m * k, 5);
        const b = randn(n * k, 6);
        const c = new Float32Array(m * n).fill(NaN);
        atLevel(level, () => ops.gemm({ a, b, c, m, n, k, transB: true }));
        expect(allFinite(c), `${level} ${m}x${n}x${k}`).toBe(true);
      }
  });

  it('k = 0 gives beta * c', () => {
    const c = new Float32Array([1, 2, 3, 4]);
    ops.gemm({ a: new Float32Array(0), b: new Float32Array(0), c, m: 2, n: 2, k: 0, beta: 0.5 });
    expect(Array.from(c)).toEqual([0.5, 1, 1.5, 2]);
  });

  it('toBf16 / fromBf16 round to nearest even and keep specials', () => {
    const x = new Float32Array([1, -2.5, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, Infinity, -0]);
    const y = ops.fromBf16(ops.toBf16(x));
    expect(Array.from(y)).toEqual([1, -2.5, 1, 1 + 4 * 2 ** -8, 1 + 2 * 2 ** -8, Infinity, -0]);
    expect(Number.isNaN(ops.fromBf16(ops.toBf16(new Float32Array([NaN])))[0])).toBe(true);
  });

  // With AVX512_BF16 the fast kernel rounds A to bf16 (8-bit mantissa): ~1e-2 of the output scale.
  const bf16Dot = Boolean(info().cpu.avx512bf16);
  for (const level of fastLevels()) {
    it(`bf16 B matches the reference at ${level}`, () => {
      const tol = level === 'avx512' && bf16Dot ? 1e-2 : 1e-5;
      const list: [number, number, number, boolean][] = [
        [1, 688, 256, true],
        [1, 33, 17, false],
        [3, 7, 129, true],
        [16, 65, 300, false],
        [17, 65, 33, true],
        [129, 300, 65, false],
        [300, 129, 300, true],
        [2, 1100, 520, false], // small M, B over 1 MiB: the streaming path
      ];
      for (const [idx, [m, n, k, transB]] of list.entries()) {
        const a = randn(m * (k + 2), idx + 1);
        const bf = randn(transB ? n * k : k * n, idx + 2);
        const b = ops.toBf16(bf);
        const c0 = randn(m * n, idx + 3);
        const args = { a, b, m, n, k, transB, lda: k + 2, alpha: 0.5, beta: idx % 2 ? 0.5 : 0 };
        const ref = atLevel('reference', () => ops.gemmBf16({ ...args, c: c0.slice() }));
        const got = atLevel(level, () => ops.gemmBf16({ ...args, c: c0.slice() }));
        // Same as the fp32 GEMM on the widened B.
        const f = atLevel('reference', () => ops.gemm({ ...args, b: ops.fromBf16(b), c: c0.slice() }));
        expect(relErr(ref, f)).toBeLessThan(1e-6);
        expect(relErr(got, ref), `${m}x${n}x${k} transB=${transB}`).toBeLessThan(tol);
      }
    });
  }

  // The bf16-pair path (AVX512_BF16 dot products, A rounded to bf16), forced at every level with the
  // BTS_GEMM_BF16DOT=1 hook (emulated in fp32 below avx512): it must equal the fp32 GEMM of bf16(A)
  // and bf16 B, covering its packing (odd K pads the last pair, edge tiles, several KC steps).
  it('bf16-pair path equals the GEMM of bf16-rounded A at every level', () => {
    process.env.BTS_GEMM_BF16DOT = '1';
    try {
      for (const level of fastLevels())
        for (const [idx, [m, n, k, transB]] of ([
          [17, 65, 33, true],
          [40, 33, 7, false],
          [150, 70, 601, true],
          [150, 70, 601, false],
        ] as [number, number, number, boolean][]).entries()) {
          const a = randn(m * k, idx + 11);
          const b = ops.toBf16(randn(n * k, idx + 12));
          const c0 = randn(m * n, idx + 13);
          const args = { m, n, k, transB, alpha: 1.25, beta: 0.5 };
          const got = atLevel(level, () => ops.gemmBf16({ ...args, a, b, c: c0.slice() }));
          const ref = atLevel('reference', () => ops.gemmBf16({ ...args, a: ops.fromBf16(ops.toBf16(a)), b, c: c0.slice() }));
          expect(relErr(got, ref), `${level} ${m}x${n}x${k} transB=${transB}`).toBeLessThan(2e-5);
        }
    } finally {
      delete process.env.BTS_GEMM_BF16DOT;
    }
  });

  it('async forms equal the sync forms', async () => {
    const [m, n, k] = [40, 50, 60];
    const a = randn(m * k, 8);
    const b = randn(n * k, 9);
    const s = ops.gemm({ a, b, m, n, k, transB: true });
    const as = await ops.gemmAsync({ a, b, m, n, k, transB: true });
    expect(Array.from(as)).toEqual(Array.from(s));
    const bb = ops.toBf16(b);
    const s16 = ops.gemmBf16({ a, b: bb, m, n, k });
    const as16 = await ops.gemmBf16Async({ a, b: bb, m, n, k });
    expect(Array.from(as16)).toEqual(Array.from(s16));
  });

  it('rejects bad lengths, dtypes and options with typed errors naming the argument', () => {
    const a = new Float32Array(6), b = new Float32Array(12);
    expect(() => ops.gemm({ a: new Float32Array(5), b, m: 2, n: 4, k: 3 })).toThrow(ShapeError);
    expect(() => ops.gemm({ a: new Float32Array(5), b, m: 2, n: 4, k: 3 })).toThrow(/'a'/);
    expect(() => ops.gemm({ a, b: new Float32Array(11), m: 2, n: 4, k: 3 })).toThrow(/'b'/);
    expect(() => ops.gemm({ a, b, c: new Float32Array(7), m: 2, n: 4, k: 3 })).toThrow(/'c'/);
    expect(() => ops.gemm({ a, b, c: new Float32Array(7), m: 2, n: 4, k: 3 })).toThrow(ShapeError);
    // Strided: a with lda = 5 needs (2-1)*5+3 = 8 elements.
    expect(() => ops.gemm({ a: new Float32Array(7), b, m: 2, n: 4, k: 3, lda: 5 })).toThrow(/'a'.*8/);
    expect(() => ops.gemm({ a, b, m: 2, n: 4, k: 3, lda: 2 })).toThrow(ArgumentError);
    expect(() => ops.gemm({ a: new Float64Array(6) as unknown as Float32Array, b, m: 2, n: 4, k: 3 })).toThrow(DTypeError);
    expect(() => ops.gemm({ a, b, m: 2.5, n: 4, k: 3 })).toThrow(ArgumentError);
    expect(() => ops.gemm({ a, b, m: 2, n: 4, k: 3, alpha: NaN })).toThrow(ArgumentError);
    expect(() => ops.gemmBf16({ a, b: new Uint16Array(12), m: 2, n: 4, k: 3, transA: true })).toThrow(ArgumentError);
    expect(() => ops.gemmBf16({ a, b: new Float32Array(12) as unknown as Uint16Array, m: 2, n: 4, k: 3 })).toThrow(DTypeError);
    expect(() => ops.gemmBf16({ a, b: new Uint16Array(11), m: 2, n: 4, k: 3 })).toThrow(/'b'/);
  });
});
