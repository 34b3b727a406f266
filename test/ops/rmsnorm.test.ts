import { describe, expect, it } from 'vitest';
import { ops, ShapeError, DTypeError } from '../../lib/index.js';
import { atLevel, checkGrad, dot, fastLevels, randn, relErr } from '../helpers.js';

const shapes: [number, number][] = [
  [1, 1],
  [3, 7],
  [5, 17],
  [16, 64],
  [7, 1000],
  [33, 257],
];

describe('rmsnorm', () => {
  it('reference matches a direct JS formula', () => {
    const [N, D] = [3, 5];
    const x = randn(N * D, 1);
    const w = randn(D, 2);
    const { out } = atLevel('reference', () => ops.rmsnormForward({ x, weight: w, eps: 1e-5 }));
    for (let n = 0; n < N; n++) {
      let ss = 0;
      for (let d = 0; d < D; d++) ss += x[n * D + d] ** 2;
      const r = 1 / Math.sqrt(ss / D + 1e-5);
      for (let d = 0; d < D; d++) expect(out[n * D + d]).toBeCloseTo(x[n * D + d] * r * w[d], 5);
    }
  });

  for (const level of fastLevels()) {
    it(`forward and backward match the reference at ${level}`, () => {
      for (const [N, D] of shapes) {
        const x = randn(N * D, N * 31 + D, -2, 2);
        const w = randn(D, D + 5);
        const dout = randn(N * D, N + D);
        const ref = atLevel('reference', () => {
          const f = ops.rmsnormForward({ x, weight: w });
          const b = ops.rmsnormBackward({ x, weight: w, rstd: f.rstd, dout, dweight: new Float32Array(D).fill(0.5) });
          return { ...f, ...b };
        });
        const got = atLevel(level, () => {
          const f = ops.rmsnormForward({ x, weight: w });
          const b = ops.rmsnormBackward({ x, weight: w, rstd: f.rstd, dout, dweight: new Float32Array(D).fill(0.5) });
          return { ...f, ...b };
        });
        expect(relErr(got.out, ref.out), `out ${N}x${D}`).toBeLessThan(1e-5);
        expect(relErr(got.rstd, ref.rstd), `rstd ${N}x${D}`).toBeLessThan(1e-5);
        expect(relErr(got.dx, ref.dx, 1), `dx ${N}x${D}`).toBeLessThan(1e-5);
        expect(relErr(got.dweight!, ref.dweight!), `dw ${N}x${D}`).toBeLessThan(1e-5);
      }
    });
  }

  for (const level of ['reference' as const, ...fastLevels()]) {
    it(`backward agrees with finite differences at ${level}`, () => {
      const [N, D] = [4, 24];
      const x = randn(N * D, 11);
      const w = randn(D, 12, 0.5, 1.5);
      const R = randn(N * D, 13);
      atLevel(level, () => {
        const loss = () => dot(ops.rmsnormForward({ x, weight: w }).out, R);
        const { rstd } = ops.rmsnormForward({ x, weight: w });
        const { dx, dweight } = ops.rmsnormBackward({ x, weight: w, rstd, dout: R, dweight: new Float32Array(D) });
        expect(checkGrad(loss, x, dx, { eps: 1e-2 })).toBeLessThan(2e-2);
        expect(checkGrad(loss, w, dweight!, { eps: 1e-2 })).toBeLessThan(2e-2);
      });
    });
  }

  it('async form gives the same result', async () => {
    const x = randn(8 * 40, 3);
    const w = randn(40, 4);
    const a = ops.rmsnormForward({ x, weight: w });
    const b = await ops.rmsnormForwardAsync({ x, weight: w });
    expect(Array.from(b.out)).toEqual(Array.from(a.out));
  });

  it('rejects bad shapes and dtypes with typed errors naming the argument', () => {
    expect(() => ops.rmsnormForward({ x: new Float32Array(10), weight: new Float32Array(3) })).toThrow(ShapeError);
    expect(() => ops.rmsnormForward({ x: new Float32Array(10), weight: new Float32Array(3) })).toThrow(/'x'/);
    expect(() => ops.rmsnormForward({ x: new Float64Array(6) as unknown as Float32Array, weight: new Float32Array(3) })).toThrow(DTypeError);
    expect(() =>
      ops.rmsnormBackward({ x: new Float32Array(6), weight: new Float32Array(3), rstd: new Float32Array(1), dout: new Float32Array(6) }),
    ).toThrow(/'rstd'/);
  });
});
