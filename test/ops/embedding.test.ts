import { describe, expect, it } from 'vitest';
import { ops, ShapeError, DTypeError, TokenRangeError, ArgumentError } from '../../lib/index.js';
import { atLevel, checkGrad, dot, fastLevels, randIds, randn } from '../helpers.js';

// [N, V, D]: tiny, odd, not multiples of 8/16, repeated ids (N > V), wide rows split across threads.
const shapes: [number, number, number][] = [
  [1, 1, 1],
  [7, 3, 5],
  [17, 5, 17],
  [33, 257, 24],
  [64, 7, 100],
  [200, 1000, 33],
  [9, 11, 1000],
];

describe('embedding', () => {
  it('reference matches a direct JS formula', () => {
    const [V, D] = [4, 3];
    const table = randn(V * D, 1);
    const ids = new Int32Array([2, 0, 2, 3]);
    const { out } = atLevel('reference', () => ops.embeddingForward({ ids, table, dim: D }));
    for (let n = 0; n < ids.length; n++) for (let d = 0; d < D; d++) expect(out[n * D + d]).toBe(table[ids[n] * D + d]);
    const dout = randn(ids.length * D, 2);
    const dtable = new Float32Array(V * D).fill(0.25);
    atLevel('reference', () => ops.embeddingBackward({ ids, dout, dtable, dim: D }));
    for (let v = 0; v < V; v++)
      for (let d = 0; d < D; d++) {
        let s = 0.25;
        for (let n = 0; n < ids.length; n++) if (ids[n] === v) s = Math.fround(s + dout[n * D + d]);
        expect(dtable[v * D + d]).toBe(s);
      }
  });

  for (const level of fastLevels()) {
    it(`forward and backward match the reference exactly at ${level}`, () => {
      for (const [N, V, D] of shapes) {
        const table = randn(V * D, V + D);
        const ids = randIds(N, V, N * 3 + V);
        const dout = randn(N * D, N + 7 * D);
        const run = () => {
          const { out } = ops.embeddingForward({ ids, table, dim: D });
          const dtable = new Float32Array(V * D).fill(0.5);
          ops.embeddingBackward({ ids, dout, dtable, dim: D });
          return { out, dtable };
        };
        const ref = atLevel('reference', run);
        const got = atLevel(level, run);
        // Same additions in the same order (rows of a token in increasing n): bit-identical.
        expect(Array.from(got.out), `out ${N}x${V}x${D}`).toEqual(Array.from(ref.out));
        expect(Array.from(got.dtable), `dtable ${N}x${V}x${D}`).toEqual(Array.from(ref.dtable));
      }
    });
  }

  it('backward sums repeated ids (all rows the same token)', () => {
    const [N, V, D] = [50, 3, 19];
    const ids = new Int32Array(N).fill(1);
    const dout = randn(N * D, 5);
    for (const level of ['reference' as const, ...fastLevels()]) {
      const dtable = atLevel(level, () => ops.embeddingBackward({ ids, dout, dtable: new Float32Array(V * D), dim: D }).dtable);
      for (let d = 0; d < D; d++) {
        let s = 0;
        for (let n = 0; n < N; n++) s += dout[n * D + d];
        expect(dtable[D + d]).toBeCloseTo(s, 4);
        expect(dtable[d]).toBe(0);
        expect(dtable[2 * D + d]).toBe(0);
      }
    }
  });

  for (const level of ['reference' as const, ...fastLevels()]) {
    it(`backward agrees with finite differences at ${level}`, () => {
      const [N, V, D] = [12, 5, 9];
      const table = randn(V * D, 11);
      const ids = randIds(N, V, 12);
      const R = randn(N * D, 13);
      atLevel(level, () => {
        const loss = () => dot(ops.embeddingForward({ ids, table, dim: D }).out, R);
        const { dtable } = ops.embeddingBackward({ ids, dout: R, dtable: new Float32Array(V * D), dim: D });
        expect(checkGrad(loss, table, dtable, { eps: 1e-2 })).toBeLessThan(1e-3);
      });
    });
  }

  it('async form gives the same result', async () => {
    const table = randn(30 * 16, 3);
    const ids = randIds(40, 30, 4);
    const a = ops.embeddingForward({ ids, table, dim: 16 });
    const b = await ops.embeddingForwardAsync({ ids, table, dim: 16 });
    expect(Array.from(b.out)).toEqual(Array.from(a.out));
    const dout = randn(40 * 16, 5);
    const d1 = ops.embeddingBackward({ ids, dout, dtable: new Float32Array(30 * 16), dim: 16 });
    const d2 = await ops.embeddingBackwardAsync({ ids, dout, dtable: new Float32Array(30 * 16), dim: 16 });
    expect(Array.from(d2.dtable)).toEqual(Array.from(d1.dtable));
  });

  it('rejects bad ids, shapes and dtypes with typed errors naming the argument', () => {
    const table = new Float32Array(10 * 4);
    for (const bad of [10, -1, 2 ** 31 - 1]) {
      const ids = new Int32Array([0, 3, 9, bad, 2]);
      expect(() => ops.embeddingForward({ ids, table, dim: 4 })).toThrow(TokenRangeError);
      expect(() => ops.embeddingForward({ ids, table, dim: 4 })).toThrow(new RegExp(`'ids' at position 3 is ${bad}`));
      expect(() => ops.embeddingBackward({ ids, dout: new Float32Array(20), dtable: new Float32Array(40), dim: 4 })).toThrow(
        /'ids' at position 3/,
      );
    }
    // Nothing was written before the bad id was found.
    const dtable = new Float32Array(40);
    expect(() =>
      ops.embeddingBackward({ ids: new Int32Array([1, 99]), dout: new Float32Array(8).fill(1), dtable, dim: 4 }),
    ).toThrow(TokenRangeError);
    expect(dtable.every((x) => x === 0)).toBe(true);
    expect(() => ops.embeddingForward({ ids: new Int32Array(2), table: new Float32Array(10), dim: 4 })).toThrow(ShapeError);
    expect(() => ops.embeddingForward({ ids: new Int32Array(2), table: new Float32Array(10), dim: 4 })).toThrow(/'table'/);
    expect(() => ops.embeddingForward({ ids: new Int32Array(2), table, dim: 4, out: new Float32Array(7) })).toThrow(/'out'/);
    expect(() => ops.embeddingForward({ ids: new Float32Array(2) as unknown as Int32Array, table, dim: 4 })).toThrow(DTypeError);
    expect(() => ops.embeddingForward({ ids: new Int32Array(2), table, dim: 0 })).toThrow(ArgumentError);
    expect(() => ops.embeddingBackward({ ids: new Int32Array(2), dout: new Float32Array(7), dtable, dim: 4 })).toThrow(/'dout'/);
    expect(() => ops.embeddingBackward({ ids: new Int32Array(2), dout: new Float32Array(8), dtable: new Float32Array(6), dim: 4 })).toThrow(
      /'dtable'/,
    );
  });
});
