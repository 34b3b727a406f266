import { describe, expect, it } from 'vitest';
import { ops, ArgumentError, DTypeError, ShapeError } from '../../lib/index.js';
import { allFinite, atLevel, checkGrad, dot, fastLevels, randn, relErr } from '../helpers.js';

const sig = (z: number) => 1 / (1 + Math.exp(-z));
// (N, D) pairs: tiny, odd, not multiples of 8/16, and one wide row.
const shapes: [number, number][] = [
  [1, 1],
  [7, 7],
  [3, 33],
  [5, 257],
  [2, 1000],
];
const expertCounts = [1, 2, 3, 5];

describe('stitch mix', () => {
  it('E->H reference matches a direct JS softmax mix', () => {
    const [N, D, n] = [2, 3, 2];
    const M = n + 1;
    const h0 = randn(N * D, 1);
    const p = randn(n * N * D, 2);
    const gate = randn(N * D * M, 3, -3, 3);
    const out = atLevel('reference', () => ops.stitchEHForward({ h0, p, gate, experts: n }).out);
    for (let e = 0; e < N * D; e++) {
      const z = Array.from(gate.subarray(e * M, e * M + M));
      const mx = Math.max(...z);
      const w = z.map((v) => Math.exp(v - mx));
      const s = w.reduce((a, b) => a + b, 0);
      let want = (w[0] / s) * h0[e];
      for (let i = 1; i <= n; i++) want += (w[i] / s) * p[(i - 1) * N * D + e];
      expect(out[e]).toBeCloseTo(want, 6);
    }
  });

  it('H->E reference matches a direct JS sigmoid mix', () => {
    const [N, D, n] = [2, 3, 3];
    const M = n + 1;
    const h = randn(n * N * D, 4);
    const q = randn(n * N * D, 5);
    const gate = randn(N * D * M, 6, -3, 3);
    const out = atLevel('reference', () => ops.stitchHEForward({ h, q, gate, experts: n }).out);
    for (let i = 1; i <= n; i++)
      for (let e = 0; e < N * D; e++) {
        const g = sig(gate[e * M + i]);
        const k = (i - 1) * N * D + e;
        expect(out[k]).toBeCloseTo((1 - g) * h[k] + g * q[k], 6);
      }
  });

  it('zero gates: E->H gives the mean of h0 and the p_i, H->E the midpoint of h_i and q_i', () => {
    const [N, D, n] = [3, 19, 3];
    for (const level of ['reference' as const, ...fastLevels()]) {
      atLevel(level, () => {
        const h0 = randn(N * D, 7);
        const p = randn(n * N * D, 8);
        const zero = new Float32Array(N * D * (n + 1));
        const eh = ops.stitchEHForward({ h0, p, gate: zero, experts: n }).out;
        for (let e = 0; e < N * D; e++) {
          let s = h0[e];
          for (let i = 0; i < n; i++) s += p[i * N * D + e];
          expect(eh[e]).toBeCloseTo(s / (n + 1), 6);
        }
        const he = ops.stitchHEForward({ h: p, q: p.map((v) => v + 2), gate: zero, experts: n }).out;
        for (let k = 0; k < n * N * D; k++) expect(he[k]).toBeCloseTo(p[k] + 1, 6);
      });
    }
  });

  for (const level of fastLevels()) {
    it(`E->H and H->E forward and backward match the reference at ${level}`, () => {
      for (const n of expertCounts)
        for (const [N, D] of shapes) {
          const M = n + 1;
          const seed = N * 1000 + D * 10 + n;
          const h0 = randn(N * D, seed, -2, 2);
          const p = randn(n * N * D, seed + 1, -2, 2);
          const h = randn(n * N * D, seed + 2, -2, 2);
          // Logits up to +-60: the max-subtracted softmax must not overflow.
          const gate = randn(N * D * M, seed + 3, -60, 60);
          const dout = randn(N * D, seed + 4);
          const doutE = randn(n * N * D, seed + 5);
          const run = () => ({
            eh: ops.stitchEHForward({ h0, p, gate, experts: n }).out,
            ehb: ops.stitchEHBackward({ h0, p, gate, dout, experts: n }),
            he: ops.stitchHEForward({ h, q: p, gate, experts: n }).out,
            heb: ops.stitchHEBackward({ h, q: p, gate, dout: doutE, experts: n }),
          });
          const ref = atLevel('reference', run);
          const got = atLevel(level, run);
          const tag = `n=${n} ${N}x${D}`;
          // fp32 element-wise math with a polynomial exp (~2e-7 rel.): a few ulps of the output scale.
          const tol = 3e-6;
          expect(allFinite(got.eh)).toBe(true);
          expect(relErr(got.eh, ref.eh), `eh ${tag}`).toBeLessThan(tol);
          expect(relErr(got.ehb.dh0, ref.ehb.dh0), `dh0 ${tag}`).toBeLessThan(tol);
          expect(relErr(got.ehb.dp, ref.ehb.dp), `dp ${tag}`).toBeLessThan(tol);
          expect(relErr(got.ehb.dgate, ref.ehb.dgate), `eh dgate ${tag}`).toBeLessThan(tol);
          expect(relErr(got.he, ref.he), `he ${tag}`).toBeLessThan(tol);
          expect(relErr(got.heb.dh, ref.heb.dh), `dh ${tag}`).toBeLessThan(tol);
          expect(relErr(got.heb.dq, ref.heb.dq), `dq ${tag}`).toBeLessThan(tol);
          expect(relErr(got.heb.dgate, ref.heb.dgate), `he dgate ${tag}`).toBeLessThan(tol);
          for (let e = 0; e < N * D; e++) expect(got.heb.dgate[e * M]).toBe(0);
        }
    });
  }

  for (const level of ['reference' as const, ...fastLevels()]) {
    it(`E->H backward agrees with finite differences (h0, p, gate) at ${level}`, () => {
      for (const n of [1, 3]) {
        const [N, D] = [3, 11];
        const h0 = randn(N * D, 21 + n);
        const p = randn(n * N * D, 22 + n);
        const gate = randn(N * D * (n + 1), 23 + n, -2, 2);
        const R = randn(N * D, 24 + n);
        atLevel(level, () => {
          const loss = () => dot(ops.stitchEHForward({ h0, p, gate, experts: n }).out, R);
          const g = ops.stitchEHBackward({ h0, p, gate, dout: R, experts: n });
          expect(checkGrad(loss, h0, g.dh0), `dh0 n=${n}`).toBeLessThan(1e-2);
          expect(checkGrad(loss, p, g.dp), `dp n=${n}`).toBeLessThan(1e-2);
          expect(checkGrad(loss, gate, g.dgate, { count: 40 }), `dgate n=${n}`).toBeLessThan(1e-2);
        });
      }
    });

    it(`H->E backward agrees with finite differences (h, q, gate) at ${level}`, () => {
      for (const n of [1, 2, 5]) {
        const [N, D] = [2, 13];
        const h = randn(n * N * D, 31 + n);
        const q = randn(n * N * D, 32 + n);
        const gate = randn(N * D * (n + 1), 33 + n, -2, 2);
        const R = randn(n * N * D, 34 + n);
        atLevel(level, () => {
          const loss = () => dot(ops.stitchHEForward({ h, q, gate, experts: n }).out, R);
          const g = ops.stitchHEBackward({ h, q, gate, dout: R, experts: n });
          expect(checkGrad(loss, h, g.dh), `dh n=${n}`).toBeLessThan(1e-2);
          expect(checkGrad(loss, q, g.dq), `dq n=${n}`).toBeLessThan(1e-2);
          expect(checkGrad(loss, gate, g.dgate, { count: 40 }), `dgate n=${n}`).toBeLessThan(1e-2);
        });
      }
    });
  }

  it('outputs may replace their inputs (out = h0 / h, dh0 = dout, dh = dout)', () => {
    const [N, D, n] = [4, 37, 3];
    for (const level of ['reference' as const, ...fastLevels()]) {
      atLevel(level, () => {
        const h0 = randn(N * D, 41);
        const p = randn(n * N * D, 42);
        const gate = randn(N * D * (n + 1), 43, -3, 3);
        const dout = randn(N * D, 44);
        const want = ops.stitchEHForward({ h0, p, gate, experts: n }).out;
        const wantB = ops.stitchEHBackward({ h0, p, gate, dout, experts: n });
        const a = h0.slice();
        ops.stitchEHForward({ h0: a, p, gate, experts: n, out: a });
        expect(Array.from(a)).toEqual(Array.from(want));
        const d = dout.slice();
        const gotB = ops.stitchEHBackward({ h0, p, gate, dout: d, experts: n, dh0: d });
        expect(Array.from(gotB.dh0)).toEqual(Array.from(wantB.dh0));
        expect(Array.from(gotB.dgate)).toEqual(Array.from(wantB.dgate));
        const h = p.map((v) => -v);
        const wantH = ops.stitchHEForward({ h, q: p, gate, experts: n }).out;
        ops.stitchHEForward({ h, q: p, gate, experts: n, out: h });
        expect(Array.from(h)).toEqual(Array.from(wantH));
        const doutE = randn(n * N * D, 45);
        const wantHB = ops.stitchHEBackward({ h: p, q: wantH, gate, dout: doutE, experts: n });
        const dE = doutE.slice();
        const gotHB = ops.stitchHEBackward({ h: p, q: wantH, gate, dout: dE, experts: n, dh: dE });
        expect(Array.from(gotHB.dh)).toEqual(Array.from(wantHB.dh));
        expect(Array.from(gotHB.dq)).toEqual(Array.from(wantHB.dq));
        expect(Array.from(gotHB.dgate)).toEqual(Array.from(wantHB.dgate));
      });
    }
  });

  it('async forms give the same results', async () => {
    const [N, D, n] = [16, 64, 3];
    const h0 = randn(N * D, 51);
    const p = randn(n * N * D, 52);
    const gate = randn(N * D * (n + 1), 53);
    const dout = randn(N * D, 54);
    const doutE = randn(n * N * D, 55);
    const same = (a: Float32Array, b: Float32Array) => expect(Array.from(a)).toEqual(Array.from(b));
    same((await ops.stitchEHForwardAsync({ h0, p, gate, experts: n })).out, ops.stitchEHForward({ h0, p, gate, experts: n }).out);
    const b1 = await ops.stitchEHBackwardAsync({ h0, p, gate, dout, experts: n });
    const b2 = ops.stitchEHBackward({ h0, p, gate, dout, experts: n });
    same(b1.dh0, b2.dh0);
    same(b1.dp, b2.dp);
    same(b1.dgate, b2.dgate);
    same((await ops.stitchHEForwardAsync({ h: p, q: p, gate, experts: n })).out, ops.stitchHEForward({ h: p, q: p, gate, experts: n }).out);
    const c1 = await ops.stitchHEBackwardAsync({ h: p, q: doutE, gate, dout: doutE, experts: n });
    const c2 = ops.stitchHEBackward({ h: p, q: doutE, gate, dout: doutE, experts: n });
    same(c1.dh, c2.dh);
    same(c1.dq, c2.dq);
    same(c1.dgate, c2.dgate);
  });

  it('rejects bad shapes, dtypes and expert counts naming the argument', () => {
    const ND = 10;
    const h0 = new Float32Array(ND);
    const p = new Float32Array(3 * ND);
    const gate = new Float32Array(4 * ND);
    expect(() => ops.stitchEHForward({ h0, p, gate: new Float32Array(4 * ND - 1), experts: 3 })).toThrow(ShapeError);
    expect(() => ops.stitchEHForward({ h0, p, gate: new Float32Array(4 * ND - 1), experts: 3 })).toThrow(/'gate'/);
    expect(() => ops.stitchEHForward({ h0, p: new Float32Array(2 * ND), gate, experts: 3 })).toThrow(/'p'/);
    expect(() => ops.stitchEHForward({ h0, p, gate, experts: 0 })).toThrow(ArgumentError);
    expect(() => ops.stitchEHForward({ h0, p, gate, experts: 2.5 })).toThrow(/'experts'/);
    expect(() => ops.stitchEHForward({ h0, p, gate, experts: 3, out: new Float32Array(ND + 1) })).toThrow(/'out'/);
    expect(() => ops.stitchEHBackward({ h0, p, gate, dout: new Float32Array(ND - 1), experts: 3 })).toThrow(/'dout'/);
    expect(() => ops.stitchEHBackward({ h0, p, gate, dout: h0, experts: 3, dgate: new Float32Array(3) })).toThrow(/'dgate'/);
    expect(() => ops.stitchHEForward({ h: new Float32Array(3 * ND + 1), q: p, gate, experts: 3 })).toThrow(/'h'/);
    expect(() => ops.stitchHEForward({ h: p, q: new Float32Array(ND), gate, experts: 3 })).toThrow(/'q'/);
    expect(() => ops.stitchHEBackward({ h: p, q: p, gate, dout: h0, experts: 3 })).toThrow(/'dout'/);
    expect(() => ops.stitchHEForward({ h: p, q: p, gate: new Float64Array(4 * ND) as unknown as Float32Array, experts: 3 })).toThrow(
      DTypeError,
    );
    // Empty inputs are a no-op.
    expect(ops.stitchEHForward({ h0: new Float32Array(0), p: new Float32Array(0), gate: new Float32Array(0), experts: 2 }).out.length).toBe(0);
  });
});
