import { describe, expect, it } from 'vitest';
import { ops, ShapeError, DTypeError, TokenRangeError, ArgumentError, type SimdLevel } from '../../lib/index.js';
import { atLevel, checkGrad, fastLevels, randIds, randn, relErr } from '../helpers.js';

const IGN = -100;

/** Targets in [0, V) with every `every`-th row ignored (none when every = 0). */
function targetsFor(N: number, V: number, seed: number, every = 0): Int32Array {
  const t = randIds(N, V, seed);
  if (every > 0) for (let n = 1; n < N; n += every) t[n] = IGN;
  return t;
}

/** Direct JS formula, all in double: losses, dx, dW (dW added to dw0). */
function jsCrossEntropy(x: Float32Array, w: Float32Array, t: Int32Array, gs: number, dw0: Float32Array) {
  const N = t.length;
  const D = x.length / N;
  const V = w.length / D;
  const losses = new Float64Array(N);
  const dx = new Float64Array(N * D);
  const dw = Float64Array.from(dw0);
  let sum = 0;
  let count = 0;
  for (let n = 0; n < N; n++) {
    if (t[n] === IGN) continue;
    const z: number[] = [];
    for (let v = 0; v < V; v++) {
      let s = 0;
      for (let d = 0; d < D; d++) s += x[n * D + d] * w[v * D + d];
      z.push(s);
    }
    const mx = Math.max(...z);
    const lse = mx + Math.log(z.reduce((a, b) => a + Math.exp(b - mx), 0));
    losses[n] = lse - z[t[n]];
    sum += losses[n];
    count++;
    for (let v = 0; v < V; v++) {
      const g = gs * (Math.exp(z[v] - lse) - (v === t[n] ? 1 : 0));
      for (let d = 0; d < D; d++) {
        dx[n * D + d] += g * w[v * D + d];
        dw[v * D + d] += g * x[n * D + d];
      }
    }
  }
  return { losses, dx, dw, sum, count };
}

interface Run {
  losses: Float32Array;
  lossSum: number;
  count: number;
  dx: Float32Array;
  dweight: Float32Array;
}

function run(level: SimdLevel, x: Float32Array, w: Float32Array, targets: Int32Array, extra: { gradScale?: number; vocabChunk?: number; rowBlock?: number } = {}): Run {
  return atLevel(level, () => {
    const dweight = new Float32Array(w.length).fill(0.125);
    const r = ops.crossEntropy({ x, weight: w, targets, dweight, ...extra });
    return { losses: r.losses, lossSum: r.lossSum, count: r.count, dx: r.dx!, dweight: r.dweight! };
  });
}

describe('cross-entropy (fused LM head)', () => {
  it('reference matches a direct JS formula (with an ignored row)', () => {
    const [N, D, V] = [4, 3, 5];
    const x = randn(N * D, 1, -2, 2);
    const w = randn(V * D, 2, -2, 2);
    const t = new Int32Array([4, IGN, 0, 2]);
    const got = run('reference', x, w, t, { gradScale: 0.5 });
    const ref = jsCrossEntropy(x, w, t, 0.5, new Float32Array(V * D).fill(0.125));
    expect(got.count).toBe(3);
    expect(got.lossSum).toBeCloseTo(ref.sum, 5);
    expect(relErr(got.losses, ref.losses)).toBeLessThan(1e-6);
    expect(relErr(got.dx, ref.dx)).toBeLessThan(1e-6);
    expect(relErr(got.dweight, ref.dw)).toBeLessThan(1e-6);
    const mean = ops.crossEntropy({ x, weight: w, targets: t }).loss;
    expect(mean).toBeCloseTo(ref.sum / 3, 5);
  });

  // [N, D, V, vocabChunk, rowBlock]: 0 = automatic blocking. Forced small chunks and blocks exercise the
  // online log-sum-exp across chunks, the recompute pass and the chunk / block boundaries (the target
  // at the first or last column of a chunk, a last chunk or block of 1).
  const shapes: [number, number, number, number, number][] = [
    [1, 1, 1, 0, 0],
    [3, 5, 7, 0, 0],
    [7, 17, 257, 0, 0],
    [33, 16, 1000, 0, 0],
    [9, 33, 7, 0, 0],
    [17, 24, 257, 256, 0],
    [17, 24, 257, 7, 5],
    [40, 13, 1000, 333, 16],
    [33, 40, 1025, 1024, 32],
    [5, 9, 64, 8, 1],
    [70, 8, 100, 1, 0],
  ];
  // Tolerance: the fast levels compute logits as float dot products over D (GEMM) and sum exp in float
  // blocks; the reference works in double. 2e-5 relative to each output's scale.
  for (const level of fastLevels()) {
    it(`loss and gradients match the reference at ${level} (odd shapes, chunk and block boundaries)`, () => {
      for (const [N, D, V, vc, rb] of shapes) {
        const x = randn(N * D, N * 7 + D, -1.5, 1.5);
        const w = randn(V * D, V + D, -1.5, 1.5);
        const t = targetsFor(N, V, N + V, N > 4 ? 4 : 0);
        if (V > 2 && vc > 1 && N > 2) {
          t[0] = vc - 1; // last column of the first chunk
          t[2] = Math.min(V - 1, vc); // first column of the second chunk
        }
        const ref = run('reference', x, w, t, { gradScale: 0.75 });
        const got = run(level, x, w, t, { gradScale: 0.75, vocabChunk: vc, rowBlock: rb });
        const tag = `${N}x${D}x${V} chunk ${vc} block ${rb}`;
        expect(got.count, tag).toBe(ref.count);
        expect(relErr(got.losses, ref.losses, 1), `losses ${tag}`).toBeLessThan(2e-5);
        expect(Math.abs(got.lossSum - ref.lossSum) / Math.max(1, ref.lossSum), `lossSum ${tag}`).toBeLessThan(2e-5);
        expect(relErr(got.dx, ref.dx, 1e-3), `dx ${tag}`).toBeLessThan(2e-5);
        expect(relErr(got.dweight, ref.dweight), `dweight ${tag}`).toBeLessThan(2e-5);
      }
    });
  }

  it('chunks automatically above V = 65536 and still matches the reference', () => {
    const [N, D, V] = [70, 3, 70001];
    const x = randn(N * D, 5, -2, 2);
    const w = randn(V * D, 6, -2, 2);
    const t = targetsFor(N, V, 7, 5);
    const ref = run('reference', x, w, t);
    for (const level of fastLevels()) {
      const got = run(level, x, w, t);
      expect(relErr(got.losses, ref.losses, 1), level).toBeLessThan(2e-5);
      expect(relErr(got.dx, ref.dx), level).toBeLessThan(2e-5);
      expect(relErr(got.dweight, ref.dweight), level).toBeLessThan(2e-5);
    }
  });

  for (const level of ['reference' as const, ...fastLevels()]) {
    for (const vocabChunk of level === 'reference' ? [0] : [0, 4]) {
      it(`gradients agree with finite differences at ${level}${vocabChunk ? ' (chunked)' : ''}`, () => {
        const [N, D, V] = [5, 6, 11];
        const x = randn(N * D, 21, -1, 1);
        const w = randn(V * D, 22, -1, 1);
        const t = new Int32Array([3, IGN, 10, 0, 7]);
        atLevel(level, () => {
          const loss = () => ops.crossEntropy({ x, weight: w, targets: t, vocabChunk }).lossSum * 0.5;
          const dweight = new Float32Array(V * D);
          const { dx } = ops.crossEntropy({ x, weight: w, targets: t, gradScale: 0.5, dweight, vocabChunk });
          expect(checkGrad(loss, x, dx!, { eps: 1e-2, count: 30 })).toBeLessThan(1e-2);
          expect(checkGrad(loss, w, dweight, { eps: 1e-2, count: 40 })).toBeLessThan(1e-2);
        });
      });
    }
  }

  it('ignored rows get zero loss and zero gradient, and do not touch dweight', () => {
    const [N, D, V] = [12, 10, 37];
    const x = randn(N * D, 31);
    const w = randn(V * D, 32);
    const t = targetsFor(N, V, 33, 3);
    const keep = [...t.keys()].filter((n) => t[n] !== IGN);
    const xk = new Float32Array(keep.length * D);
    keep.forEach((n, i) => xk.set(x.subarray(n * D, n * D + D), i * D));
    const tk = Int32Array.from(keep.map((n) => t[n]));
    for (const level of ['reference' as const, ...fastLevels()]) {
      const all = run(level, x, w, t);
      const kept = run(level, xk, w, tk);
      expect(all.count).toBe(keep.length);
      for (let n = 0; n < N; n++)
        if (t[n] === IGN) {
          expect(all.losses[n]).toBe(0);
          for (let d = 0; d < D; d++) expect(all.dx[n * D + d]).toBe(0);
        }
      expect(all.lossSum).toBeCloseTo(kept.lossSum, 5);
      expect(relErr(all.dweight, kept.dweight)).toBeLessThan(1e-5);
      // Every row ignored: nothing counted, mean NaN, dweight untouched.
      const none = atLevel(level, () => {
        const dweight = new Float32Array(V * D).fill(3);
        const r = ops.crossEntropy({ x, weight: w, targets: new Int32Array(N).fill(IGN), dweight });
        return { r, dweight };
      });
      expect(none.r.count).toBe(0);
      expect(none.r.loss).toBeNaN();
      expect(none.dweight.every((v) => v === 3)).toBe(true);
      expect(none.r.dx!.every((v) => v === 0)).toBe(true);
    }
  });

  it('zero weights give loss log(V) for every row (and a custom ignoreIndex)', () => {
    for (const V of [1, 7, 1000]) {
      const [N, D] = [6, 5];
      const t = randIds(N, V, V);
      t[4] = -1;
      for (const level of ['reference' as const, ...fastLevels()]) {
        const r = atLevel(level, () => ops.crossEntropy({ x: randn(N * D, 1), weight: new Float32Array(V * D), targets: t, ignoreIndex: -1 }));
        expect(r.count).toBe(N - 1);
        for (let n = 0; n < N; n++) expect(r.losses[n]).toBeCloseTo(n === 4 ? 0 : Math.log(V), 6);
        expect(r.loss).toBeCloseTo(Math.log(V), 6);
      }
    }
  });

  it('forward only: no dx, same losses as with the backward; frozen head (no dweight)', () => {
    const [N, D, V] = [9, 12, 50];
    const x = randn(N * D, 41);
    const w = randn(V * D, 42);
    const t = randIds(N, V, 43);
    const f = ops.crossEntropy({ x, weight: w, targets: t });
    expect(f.dx).toBeUndefined();
    const b = ops.crossEntropy({ x, weight: w, targets: t, backward: true });
    expect(b.dweight).toBeUndefined();
    expect(Array.from(b.losses)).toEqual(Array.from(f.losses));
    const full = run(fastLevels().at(-1) ?? 'reference', x, w, t);
    expect(relErr(b.dx!, full.dx)).toBeLessThan(1e-6);
  });

  it('is deterministic and async gives the same result', async () => {
    const [N, D, V] = [300, 40, 600];
    const x = randn(N * D, 51);
    const w = randn(V * D, 52);
    const t = targetsFor(N, V, 53, 7);
    const a = run(fastLevels().at(-1) ?? 'reference', x, w, t);
    const b = run(fastLevels().at(-1) ?? 'reference', x, w, t);
    expect(Array.from(b.dweight)).toEqual(Array.from(a.dweight));
    const dweight = new Float32Array(V * D).fill(0.125);
    const c = await ops.crossEntropyAsync({ x, weight: w, targets: t, dweight });
    expect(c.lossSum).toBe(a.lossSum);
    expect(c.count).toBe(a.count);
    expect(Array.from(c.losses)).toEqual(Array.from(a.losses));
    expect(Array.from(c.dx!)).toEqual(Array.from(a.dx));
    expect(Array.from(dweight)).toEqual(Array.from(a.dweight));
  });

  it('rejects bad targets, shapes and dtypes with typed errors naming the argument', () => {
    const [N, D, V] = [5, 4, 10];
    const x = new Float32Array(N * D);
    const weight = new Float32Array(V * D);
    for (const bad of [10, -1, -101]) {
      const targets = new Int32Array([0, 9, IGN, bad, 2]);
      expect(() => ops.crossEntropy({ x, weight, targets })).toThrow(TokenRangeError);
      expect(() => ops.crossEntropy({ x, weight, targets })).toThrow(new RegExp(`'targets' at position 3 is ${bad}`));
    }
    // Nothing written before the check.
    const dweight = new Float32Array(V * D);
    expect(() => ops.crossEntropy({ x: randn(N * D, 1), weight: randn(V * D, 2), targets: new Int32Array([0, 1, 2, 3, 99]), dweight })).toThrow(
      TokenRangeError,
    );
    expect(dweight.every((v) => v === 0)).toBe(true);
    const targets = new Int32Array(N);
    expect(() => ops.crossEntropy({ x: new Float32Array(N * D + 1), weight, targets })).toThrow(ShapeError);
    expect(() => ops.crossEntropy({ x: new Float32Array(N * D + 1), weight, targets })).toThrow(/'x'/);
    expect(() => ops.crossEntropy({ x, weight: new Float32Array(V * D + 2), targets })).toThrow(/'weight'/);
    expect(() => ops.crossEntropy({ x, weight, targets, dx: new Float32Array(3) })).toThrow(/'dx'/);
    expect(() => ops.crossEntropy({ x, weight, targets, dweight: new Float32Array(3) })).toThrow(/'dweight'/);
    expect(() => ops.crossEntropy({ x, weight, targets, losses: new Float32Array(3) })).toThrow(/'losses'/);
    expect(() => ops.crossEntropy({ x, weight, targets: new Float32Array(N) as unknown as Int32Array })).toThrow(DTypeError);
    expect(() => ops.crossEntropy({ x, weight, targets: new Int32Array(0) })).toThrow(/'targets'/);
    expect(() => ops.crossEntropy({ x, weight, targets, ignoreIndex: 0.5 })).toThrow(ArgumentError);
    expect(() => ops.crossEntropy({ x, weight, targets, gradScale: NaN })).toThrow(/'gradScale'/);
    expect(() => ops.crossEntropy({ x, weight, targets, vocabChunk: -1 })).toThrow(/'vocabChunk'/);
    expect(() => ops.crossEntropy({ x, weight, targets, backward: false, dx: new Float32Array(N * D) })).toThrow(/'backward'/);
  });
});
