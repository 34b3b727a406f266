import { describe, expect, it } from 'vitest';
import { ops, ShapeError, DTypeError, ArgumentError } from '../../lib/index.js';
import { atLevel, fastLevels, randn, relErr } from '../helpers.js';

interface Hyper {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  nDecay: number;
  maxGradNorm: number;
  gradScale: number;
}

/** torch.optim.AdamW + clip_grad_norm_ (without its 1e-6), written out in double. Returns the norm. */
function jsAdamW(p: Float64Array, g: Float32Array, m: Float64Array, v: Float64Array, t: number, h: Hyper): number {
  let ss = 0;
  for (let i = 0; i < g.length; i++) ss += (h.gradScale * g[i]) ** 2;
  const norm = Math.sqrt(ss);
  const clip = h.maxGradNorm > 0 && norm > h.maxGradNorm ? h.maxGradNorm / norm : 1;
  for (let i = 0; i < p.length; i++) {
    const gi = h.gradScale * clip * g[i];
    if (i < h.nDecay) p[i] *= 1 - h.lr * h.weightDecay;
    m[i] = h.beta1 * m[i] + (1 - h.beta1) * gi;
    v[i] = h.beta2 * v[i] + (1 - h.beta2) * gi * gi;
    const mhat = m[i] / (1 - h.beta1 ** t);
    const vhat = v[i] / (1 - h.beta2 ** t);
    p[i] -= (h.lr * mhat) / (Math.sqrt(vhat) + h.eps);
  }
  return norm;
}

const base: Hyper = { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1, nDecay: 0, maxGradNorm: 0, gradScale: 1 };

/** Runs `steps` native steps at `level` from fixed data; returns p, m, v and the norms. */
function runNative(level: Parameters<typeof atLevel>[0], n: number, steps: number, h: Hyper, seed: number) {
  const params = randn(n, seed);
  const m = new Float32Array(n);
  const v = new Float32Array(n);
  const norms: number[] = [];
  atLevel(level, () => {
    for (let t = 1; t <= steps; t++) {
      const grads = randn(n, seed * 100 + t, -2, 2);
      norms.push(ops.adamwStep({ params, grads, m, v, step: t, ...h }).gradNorm);
    }
  });
  return { params, m, v, norms };
}

describe('adamw', () => {
  const cases: [string, Partial<Hyper>][] = [
    ['plain, decay on a prefix', { nDecay: 5 }],
    ['clipped (norm above max) with gradScale', { nDecay: 11, maxGradNorm: 0.5, gradScale: 0.25 }],
    ['clip inactive (norm below max), no decay', { weightDecay: 0, maxGradNorm: 1e6 }],
    ['decay everywhere, beta1 = 0', { nDecay: 13, beta1: 0, lr: 3e-3 }],
  ];
  for (const [name, over] of cases) {
    it(`reference matches a JS AdamW over 4 steps: ${name}`, () => {
      const n = 13;
      const h = { ...base, ...over };
      const got = runNative('reference', n, 4, h, 3);
      const p = Float64Array.from(randn(n, 3));
      const m = new Float64Array(n);
      const v = new Float64Array(n);
      for (let t = 1; t <= 4; t++) {
        const norm = jsAdamW(p, randn(n, 300 + t, -2, 2), m, v, t, h);
        expect(got.norms[t - 1]).toBeCloseTo(norm, 5);
      }
      expect(relErr(got.params, p)).toBeLessThan(1e-6);
      expect(relErr(got.m, m)).toBeLessThan(1e-6);
      expect(relErr(got.v, v)).toBeLessThan(1e-6);
    });
  }

  it('clipping scales the update to maxGradNorm', () => {
    // With beta1 = beta2 = 0 and eps tiny the update is lr*sign(g) whatever the clip, so check m instead:
    // m = (1 - beta1) * clipped g, and ||clipped g|| = maxGradNorm.
    const n = 100;
    const grads = randn(n, 9, -3, 3);
    const m = new Float32Array(n);
    const r = ops.adamwStep({ params: new Float32Array(n), grads, m, v: new Float32Array(n), lr: 0, beta1: 0, step: 1, maxGradNorm: 2 });
    expect(r.gradNorm).toBeGreaterThan(2);
    let ss = 0;
    for (let i = 0; i < n; i++) ss += m[i] ** 2;
    expect(Math.sqrt(ss)).toBeCloseTo(2, 5);
  });

  // Fast levels against the reference: float arithmetic vs the reference's double, several steps.
  // Tolerance 2e-6 relative to the buffer's scale (a few float roundings per step).
  for (const level of fastLevels()) {
    it(`matches the reference at ${level} (several sizes, clipping, nDecay < n)`, () => {
      for (const n of [1, 7, 17, 33, 100, 257, 1000, 70001]) {
        for (const over of [{ nDecay: Math.floor(n / 3) }, { nDecay: n, maxGradNorm: 1, gradScale: 0.5 }, { nDecay: n - 1, maxGradNorm: 1e9 }]) {
          const h = { ...base, ...over, nDecay: Math.max(0, over.nDecay) };
          const ref = runNative('reference', n, 3, h, n);
          const got = runNative(level, n, 3, h, n);
          for (let t = 0; t < 3; t++) expect(Math.abs(got.norms[t] - ref.norms[t]) / ref.norms[t], `norm n=${n}`).toBeLessThan(1e-6);
          expect(relErr(got.params, ref.params), `params n=${n}`).toBeLessThan(2e-6);
          expect(relErr(got.m, ref.m), `m n=${n}`).toBeLessThan(2e-6);
          expect(relErr(got.v, ref.v), `v n=${n}`).toBeLessThan(2e-6);
        }
      }
    });
  }

  it('async form gives the same result', async () => {
    const n = 5000;
    const mk = () => ({ params: randn(n, 1), grads: randn(n, 2), m: randn(n, 3, 0, 0.1), v: randn(n, 4, 0, 0.1) });
    const s = mk();
    const r1 = ops.adamwStep({ ...s, lr: 1e-3, step: 3, weightDecay: 0.01, maxGradNorm: 1 });
    const b = mk();
    const r2 = await ops.adamwStepAsync({ ...b, lr: 1e-3, step: 3, weightDecay: 0.01, maxGradNorm: 1 });
    expect(r2.gradNorm).toBe(r1.gradNorm);
    expect(Array.from(b.params)).toEqual(Array.from(s.params));
    expect(Array.from(b.m)).toEqual(Array.from(s.m));
    expect(Array.from(b.v)).toEqual(Array.from(s.v));
  });

  it('rejects bad shapes, dtypes and hyper-parameters with typed errors naming the argument', () => {
    const n = 8;
    const ok = () => ({ params: new Float32Array(n), grads: new Float32Array(n), m: new Float32Array(n), v: new Float32Array(n), lr: 1e-3, step: 1 });
    expect(() => ops.adamwStep({ ...ok(), grads: new Float32Array(7) })).toThrow(ShapeError);
    expect(() => ops.adamwStep({ ...ok(), grads: new Float32Array(7) })).toThrow(/'grads'/);
    expect(() => ops.adamwStep({ ...ok(), v: new Float32Array(9) })).toThrow(/'v'/);
    expect(() => ops.adamwStep({ ...ok(), m: new Float64Array(n) as unknown as Float32Array })).toThrow(DTypeError);
    expect(() => ops.adamwStep({ ...ok(), step: 0 })).toThrow(ArgumentError);
    expect(() => ops.adamwStep({ ...ok(), step: 1.5 })).toThrow(/'step'/);
    expect(() => ops.adamwStep({ ...ok(), nDecay: 9 })).toThrow(/'nDecay'/);
    expect(() => ops.adamwStep({ ...ok(), nDecay: -1 })).toThrow(/'nDecay'/);
    expect(() => ops.adamwStep({ ...ok(), beta1: 1 })).toThrow(/'beta1'/);
    expect(() => ops.adamwStep({ ...ok(), beta2: -0.1 })).toThrow(/'beta2'/);
    expect(() => ops.adamwStep({ ...ok(), lr: -1 })).toThrow(/'lr'/);
    expect(() => ops.adamwStep({ ...ok(), eps: 0 })).toThrow(/'eps'/);
    expect(() => ops.adamwStep({ ...ok(), weightDecay: -0.1 })).toThrow(/'weightDecay'/);
    expect(() => ops.adamwStep({ ...ok(), lr: NaN })).toThrow(/'lr'/);
    expect(() => ops.adamwStep({ ...ok(), maxGradNorm: Infinity })).toThrow(/'maxGradNorm'/);
  });
});
