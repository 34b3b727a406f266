import { describe, expect, it } from 'vitest';
import { ops, ShapeError, DTypeError } from '../../lib/index.js';
import { allFinite, atLevel, checkGrad, dot, fastLevels, randn, relErr } from '../helpers.js';

const f32 = Math.fround;
const sig = (z: number) => 1 / (1 + Math.exp(-z));
const lengths = [1, 7, 33, 257, 1000, 4099, 3 * 688];

describe('swiglu', () => {
  it('reference matches a direct JS formula', () => {
    const gate = randn(11, 1, -4, 4);
    const up = randn(11, 2);
    const dh = randn(11, 3);
    const { h, dgate, dup } = atLevel('reference', () => ({
      ...ops.swigluForward({ gate, up }),
      ...ops.swigluBackward({ gate, up, dh }),
    }));
    for (let i = 0; i < 11; i++) {
      const g = gate[i];
      const s = sig(g);
      expect(h[i]).toBeCloseTo(g * s * up[i], 6);
      expect(dup[i]).toBeCloseTo(dh[i] * g * s, 6);
      expect(dgate[i]).toBeCloseTo(dh[i] * up[i] * s * (1 + g * (1 - s)), 6);
    }
  });

  for (const level of fastLevels()) {
    it(`forward and backward match the reference at ${level}`, () => {
      for (const len of lengths) {
        // Wide range: exp's clamping and the sigmoid tails get exercised.
        const gate = randn(len, len, -30, 30);
        const up = randn(len, len + 1, -2, 2);
        const dh = randn(len, len + 2);
        const run = () => ({ ...ops.swigluForward({ gate, up }), ...ops.swigluBackward({ gate, up, dh }) });
        const ref = atLevel('reference', run);
        const got = atLevel(level, run);
        // fp32 with a polynomial exp (~2e-7): a few ulps of the output scale.
        expect(relErr(got.h, ref.h), `h ${len}`).toBeLessThan(2e-6);
        expect(relErr(got.dgate, ref.dgate), `dgate ${len}`).toBeLessThan(2e-6);
        expect(relErr(got.dup, ref.dup), `dup ${len}`).toBeLessThan(2e-6);
      }
    });
  }

  for (const level of ['reference' as const, ...fastLevels()]) {
    it(`backward agrees with finite differences at ${level}`, () => {
      const len = 61;
      const gate = randn(len, 11, -3, 3);
      const up = randn(len, 12);
      const R = randn(len, 13);
      atLevel(level, () => {
        const loss = () => dot(ops.swigluForward({ gate, up }).h, R);
        const { dgate, dup } = ops.swigluBackward({ gate, up, dh: R });
        expect(checkGrad(loss, gate, dgate, { eps: 1e-2 })).toBeLessThan(1e-2);
        expect(checkGrad(loss, up, dup, { eps: 1e-2 })).toBeLessThan(1e-2);
      });
    });
  }

  it('stays finite at extreme inputs and handles outputs aliasing inputs', () => {
    const gate = Float32Array.from([-1e4, -100, -88, 0, 88, 100, 1e4, 3e38, -3e38]);
    const up = new Float32Array(gate.length).fill(1);
    for (const level of ['reference' as const, ...fastLevels()]) {
      const r = atLevel(level, () => ({ ...ops.swigluForward({ gate, up }), ...ops.swigluBackward({ gate, up, dh: up }) }));
      expect(allFinite(r.h), level).toBe(true);
      expect(allFinite(r.dgate), level).toBe(true);
      expect(r.h[6]).toBe(1e4);
      expect(r.h[7]).toBe(f32(3e38));
      for (const i of [0, 1, 8]) {
        expect(Math.abs(r.h[i]), `${level} h[${i}]`).toBeLessThan(1e-30); // silu(z) -> 0 for z -> -inf
        expect(Math.abs(r.dgate[i]), `${level} dgate[${i}]`).toBeLessThan(1e-30);
      }
    }
    const g = randn(100, 5);
    const u = randn(100, 6);
    const want = ops.swigluForward({ gate: g, up: u }).h;
    const g2 = g.slice();
    ops.swigluForward({ gate: g2, up: u, h: g2 });
    expect(Array.from(g2)).toEqual(Array.from(want));
  });

  it('async forms give the same results', async () => {
    const gate = randn(5000, 3);
    const up = randn(5000, 4);
    const a = ops.swigluForward({ gate, up });
    const b = await ops.swigluForwardAsync({ gate, up });
    expect(Array.from(b.h)).toEqual(Array.from(a.h));
    const c = ops.swigluBackward({ gate, up, dh: up });
    const d = await ops.swigluBackwardAsync({ gate, up, dh: up });
    expect(Array.from(d.dgate)).toEqual(Array.from(c.dgate));
    expect(Array.from(d.dup)).toEqual(Array.from(c.dup));
  });

  it('handles empty inputs and rejects bad shapes and dtypes naming the argument', () => {
    expect(ops.swigluForward({ gate: new Float32Array(0), up: new Float32Array(0) }).h.length).toBe(0);
    expect(() => ops.swigluForward({ gate: new Float32Array(6), up: new Float32Array(5) })).toThrow(ShapeError);
    expect(() => ops.swigluForward({ gate: new Float32Array(6), up: new Float32Array(5) })).toThrow(/'up'/);
    expect(() => ops.swigluForward({ gate: new Float32Array(6), up: new Float32Array(6), h: new Float32Array(5) })).toThrow(/'h'/);
    expect(() => ops.swigluForward({ gate: new Float64Array(6) as unknown as Float32Array, up: new Float32Array(6) })).toThrow(DTypeError);
    expect(() => ops.swigluBackward({ gate: new Float32Array(6), up: new Float32Array(6), dh: new Float32Array(7) })).toThrow(/'dh'/);
    expect(() =>
      ops.swigluBackward({ gate: new Float32Array(6), up: new Float32Array(6), dh: new Float32Array(6), dup: new Float32Array(2) }),
    ).toThrow(/'dup'/);
  });
});
