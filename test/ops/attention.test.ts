// Causal grouped-query attention: reference vs a direct JS formula, every fast level vs the reference
// (forward incl. KV-cache offsets and split-key decode, backward in both thread schedules), finite
// differences, decode-vs-full consistency, async, errors.
import { describe, expect, it } from 'vitest';
import { ArgumentError, DTypeError, info, ops, setThreads, ShapeError } from '../../lib/index.js';
import { allFinite, atLevel, checkGrad, dot, fastLevels, randn, relErr } from '../helpers.js';

interface Case {
  B: number;
  Tq: number;
  Tk: number;
  Tcap: number;
  H: number;
  Hkv: number;
  Dh: number;
}

/** Direct JS attention in double: softmax over the visible keys of each row, row by row. */
function direct(q: Float32Array, k: Float32Array, v: Float32Array, c: Case, scale: number) {
  const { B, Tq, Tk, Tcap, H, Hkv, Dh } = c;
  const out = new Float64Array(B * Tq * H * Dh);
  const lse = new Float64Array(B * H * Tq);
  for (let b = 0; b < B; b++)
    for (let h = 0; h < H; h++) {
      const hk = Math.floor(h / (H / Hkv));
      for (let i = 0; i < Tq; i++) {
        const qo = ((b * Tq + i) * H + h) * Dh;
        const s: number[] = [];
        for (let j = 0; j <= Tk - Tq + i; j++) {
          const ko = ((b * Tcap + j) * Hkv + hk) * Dh;
          let d = 0;
          for (let e = 0; e < Dh; e++) d += q[qo + e] * k[ko + e];
          s.push(d * scale);
        }
        const m = Math.max(...s);
        const w = s.map((x) => Math.exp(x - m));
        const sum = w.reduce((a, x) => a + x, 0);
        for (let j = 0; j < w.length; j++) {
          const vo = ((b * Tcap + j) * Hkv + hk) * Dh;
          for (let e = 0; e < Dh; e++) out[qo + e] += (w[j] / sum) * v[vo + e];
        }
        lse[(b * H + h) * Tq + i] = m + Math.log(sum);
      }
    }
  return { out, lse };
}

/** Random q, k, v for a case; k/v positions >= Tk hold NaN, so reading them would show. */
function inputs(c: Case, seed: number, amp = 1) {
  const q = randn(c.B * c.Tq * c.H * c.Dh, seed, -amp, amp);
  const k = randn(c.B * c.Tcap * c.Hkv * c.Dh, seed + 1, -amp, amp);
  const v = randn(c.B * c.Tcap * c.Hkv * c.Dh, seed + 2);
  const row = c.Hkv * c.Dh;
  for (let b = 0; b < c.B; b++)
    for (let t = c.Tk; t < c.Tcap; t++) {
      k.fill(NaN, (b * c.Tcap + t) * row, (b * c.Tcap + t + 1) * row);
      v.fill(NaN, (b * c.Tcap + t) * row, (b * c.Tcap + t + 1) * row);
    }
  return { q, k, v };
}

function forward(c: Case, x: { q: Float32Array; k: Float32Array; v: Float32Array }) {
  return ops.attentionForward({ ...x, batch: c.B, heads: c.H, kvHeads: c.Hkv, headDim: c.Dh, tk: c.Tk });
}

// Training shapes (B, T, H, Hkv, Dh): tiny, odd, GQA, crossing the 64-key tiles, Dh not a multiple of 8.
const train: [number, number, number, number, number][] = [
  [1, 1, 1, 1, 1],
  [1, 7, 2, 1, 3],
  [2, 17, 4, 2, 8],
  [1, 65, 4, 4, 16],
  [2, 130, 8, 2, 32],
  [1, 200, 2, 1, 64],
  [1, 450, 2, 2, 128], // backward: more key blocks than one key chunk holds
  [2, 70, 8, 1, 12], // groups of 8 query heads per kv head
];
// KV-cache shapes: Tq < Tk < Tcap; the 3rd, 4th and last split the keys (few items, many keys).
const cached: Case[] = [
  { B: 2, Tq: 1, Tk: 37, Tcap: 50, H: 4, Hkv: 2, Dh: 8 },
  { B: 1, Tq: 5, Tk: 130, Tcap: 140, H: 6, Hkv: 3, Dh: 17 },
  { B: 1, Tq: 1, Tk: 1000, Tcap: 1024, H: 1, Hkv: 1, Dh: 24 },
  { B: 1, Tq: 3, Tk: 700, Tcap: 701, H: 4, Hkv: 1, Dh: 16 },
  { B: 2, Tq: 3, Tk: 70, Tcap: 75, H: 72, Hkv: 1, Dh: 4 }, // group wider than a query block
  { B: 1, Tq: 1, Tk: 600, Tcap: 610, H: 8, Hkv: 4, Dh: 32 }, // kv heads walked together, split keys
];
const trainCase = ([B, T, H, Hkv, Dh]: number[]): Case => ({ B, Tq: T, Tk: T, Tcap: T, H, Hkv, Dh });
const name = (c: Case) => `B${c.B} Tq${c.Tq} Tk${c.Tk} Tcap${c.Tcap} H${c.H}/${c.Hkv} Dh${c.Dh}`;

describe('attention', () => {
  it('reference matches a direct JS softmax(q k^T) v (GQA, causal offset, unused cache)', () => {
    const cases: Case[] = [
      { B: 2, Tq: 3, Tk: 3, Tcap: 3, H: 4, Hkv: 2, Dh: 5 },
      { B: 1, Tq: 2, Tk: 5, Tcap: 7, H: 4, Hkv: 2, Dh: 3 },
      { B: 1, Tq: 1, Tk: 4, Tcap: 4, H: 3, Hkv: 1, Dh: 2 },
    ];
    for (const c of cases) {
      const x = inputs(c, 5);
      const scale = 0.7;
      const want = direct(x.q, x.k, x.v, c, scale);
      const got = atLevel('reference', () =>
        ops.attentionForward({ ...x, batch: c.B, heads: c.H, kvHeads: c.Hkv, headDim: c.Dh, tk: c.Tk, scale }),
      );
      expect(relErr(got.out, want.out), name(c)).toBeLessThan(1e-6);
      expect(relErr(got.lse, want.lse, 1), name(c)).toBeLessThan(1e-6);
    }
  });

  // fp32 sums over up to 1000 keys and 64 dims in a different order than the double reference:
  // forward ~1e-6 relative; the backward subtracts Di from dP (cancellation), hence 1e-4.
  for (const level of fastLevels()) {
    it(`forward matches the reference at ${level} (training and KV-cache shapes)`, () => {
      for (const c of [...train.map(trainCase), ...cached]) {
        for (const amp of [1, 4]) {
          const x = inputs(c, c.Tq * 7 + c.Dh + amp, amp);
          const ref = atLevel('reference', () => forward(c, x));
          const got = atLevel(level, () => forward(c, x));
          expect(allFinite(got.out), name(c)).toBe(true);
          expect(relErr(got.out, ref.out), `out ${name(c)} amp ${amp}`).toBeLessThan(2e-5);
          expect(relErr(got.lse, ref.lse, 1), `lse ${name(c)} amp ${amp}`).toBeLessThan(2e-6);
        }
      }
    });

    it(`backward matches the reference at ${level} (1, default and 3 threads: both schedules)`, () => {
      const threads = info().threads;
      try {
        for (const s of train) {
          const c = trainCase(s);
          const x = inputs(c, s[1] + 3 * s[4], 2);
          const dout = randn(x.q.length, 99 + s[1]);
          const args = { ...x, batch: c.B, heads: c.H, kvHeads: c.Hkv, headDim: c.Dh };
          const run = () => {
            const f = ops.attentionForward(args);
            return ops.attentionBackward({ ...args, out: f.out, lse: f.lse, dout });
          };
          const ref = atLevel('reference', run);
          for (const nt of [threads, 1, 3]) {
            setThreads(nt);
            const got = atLevel(level, run);
            const tag = `${name(c)} threads ${nt}`;
            expect(relErr(got.dq, ref.dq), `dq ${tag}`).toBeLessThan(2e-5);
            expect(relErr(got.dk, ref.dk), `dk ${tag}`).toBeLessThan(2e-5);
            expect(relErr(got.dv, ref.dv), `dv ${tag}`).toBeLessThan(2e-5);
            // Deterministic: the same call gives the same bits.
            const again = atLevel(level, run);
            expect(Array.from(again.dk)).toEqual(Array.from(got.dk));
          }
          setThreads(threads);
        }
      } finally {
        setThreads(threads);
      }
    });
  }

  for (const level of ['reference' as const, ...fastLevels()]) {
    it(`backward agrees with finite differences at ${level}`, () => {
      for (const c of [trainCase([1, 9, 4, 2, 5]), trainCase([2, 70, 2, 1, 4])]) {
        const x = inputs(c, 21, 1.5);
        const R = randn(x.q.length, 22);
        atLevel(level, () => {
          const args = { ...x, batch: c.B, heads: c.H, kvHeads: c.Hkv, headDim: c.Dh };
          const loss = () => dot(ops.attentionForward(args).out, R);
          const f = ops.attentionForward(args);
          const g = ops.attentionBackward({ ...args, out: f.out, lse: f.lse, dout: R });
          expect(checkGrad(loss, x.q, g.dq), `dq ${name(c)}`).toBeLessThan(2e-2);
          expect(checkGrad(loss, x.k, g.dk), `dk ${name(c)}`).toBeLessThan(2e-2);
          expect(checkGrad(loss, x.v, g.dv), `dv ${name(c)}`).toBeLessThan(2e-2);
        });
      }
    });
  }

  for (const level of ['reference' as const, ...fastLevels()]) {
    it(`decoding token by token (and in chunks) with a growing KV cache equals the full forward at ${level}`, () => {
      const [B, T, H, Hkv, Dh] = [2, 23, 4, 2, 8];
      const full = trainCase([B, T, H, Hkv, Dh]);
      const x = inputs(full, 31);
      atLevel(level, () => {
        const ref = forward(full, x);
        for (const chunk of [1, 5]) {
          const Tcap = T + 4;
          const kc = new Float32Array(B * Tcap * Hkv * Dh).fill(NaN);
          const vc = new Float32Array(B * Tcap * Hkv * Dh).fill(NaN);
          for (let t0 = 0; t0 < T; t0 += chunk) {
            const n = Math.min(chunk, T - t0);
            const q = new Float32Array(B * n * H * Dh);
            for (let b = 0; b < B; b++) {
              q.set(x.q.subarray((b * T + t0) * H * Dh, (b * T + t0 + n) * H * Dh), b * n * H * Dh);
              const src = [(b * T + t0) * Hkv * Dh, (b * T + t0 + n) * Hkv * Dh];
              kc.set(x.k.subarray(src[0], src[1]), (b * Tcap + t0) * Hkv * Dh);
              vc.set(x.v.subarray(src[0], src[1]), (b * Tcap + t0) * Hkv * Dh);
            }
            const step = ops.attentionForward({ q, k: kc, v: vc, batch: B, heads: H, kvHeads: Hkv, headDim: Dh, tk: t0 + n });
            for (let b = 0; b < B; b++)
              for (let i = 0; i < n; i++)
                for (let e = 0; e < H * Dh; e++) {
                  const want = ref.out[(b * T + t0 + i) * H * Dh + e];
                  expect(Math.abs(step.out[(b * n + i) * H * Dh + e] - want)).toBeLessThan(1e-5);
                }
            for (let b = 0; b < B; b++)
              for (let h = 0; h < H; h++)
                for (let i = 0; i < n; i++)
                  expect(step.lse[(b * H + h) * n + i]).toBeCloseTo(ref.lse[(b * H + h) * T + t0 + i], 5);
          }
        }
      });
    });
  }

  it('large scores stay finite (no -inf arithmetic), rows see key 0 only at position 0', () => {
    const c = trainCase([1, 70, 2, 1, 16]);
    const x = inputs(c, 41, 30);
    for (const level of ['reference' as const, ...fastLevels()]) {
      const f = atLevel(level, () => forward(c, x));
      expect(allFinite(f.out) && allFinite(f.lse), level).toBe(true);
      // Position 0 sees only key 0: its output is v[0] exactly (up to rounding).
      for (let h = 0; h < c.H; h++)
        for (let e = 0; e < c.Dh; e++) expect(f.out[h * c.Dh + e]).toBeCloseTo(x.v[e], 5);
      const g = atLevel(level, () =>
        ops.attentionBackward({ ...x, out: f.out, lse: f.lse, dout: randn(x.q.length, 3), heads: 2, kvHeads: 1, headDim: 16 }),
      );
      expect(allFinite(g.dq) && allFinite(g.dk) && allFinite(g.dv), level).toBe(true);
    }
  });

  it('async forms give the same result as the sync forms', async () => {
    const c = trainCase([2, 33, 4, 2, 8]);
    const x = inputs(c, 51);
    const args = { ...x, batch: 2, heads: 4, kvHeads: 2, headDim: 8 };
    const a = ops.attentionForward(args);
    const b = await ops.attentionForwardAsync(args);
    expect(Array.from(b.out)).toEqual(Array.from(a.out));
    expect(Array.from(b.lse)).toEqual(Array.from(a.lse));
    const dout = randn(x.q.length, 52);
    const ga = ops.attentionBackward({ ...args, out: a.out, lse: a.lse, dout });
    const gb = await ops.attentionBackwardAsync({ ...args, out: a.out, lse: a.lse, dout });
    expect(Array.from(gb.dq)).toEqual(Array.from(ga.dq));
    expect(Array.from(gb.dk)).toEqual(Array.from(ga.dk));
    expect(Array.from(gb.dv)).toEqual(Array.from(ga.dv));
  });

  it('rejects bad shapes, dtypes and head counts with typed errors naming the argument', () => {
    const q = new Float32Array(2 * 3 * 4 * 8);
    const k = new Float32Array(2 * 3 * 2 * 8);
    const base = { q, k, v: k, batch: 2, heads: 4, kvHeads: 2, headDim: 8 };
    expect(() => ops.attentionForward(base)).not.toThrow();
    expect(() => ops.attentionForward({ ...base, kvHeads: 3 })).toThrow(ArgumentError);
    expect(() => ops.attentionForward({ ...base, kvHeads: 3 })).toThrow(/kvHeads/);
    expect(() => ops.attentionForward({ ...base, q: new Float32Array(q.length - 1) })).toThrow(ShapeError);
    expect(() => ops.attentionForward({ ...base, q: new Float32Array(q.length - 1) })).toThrow(/'q'/);
    expect(() => ops.attentionForward({ ...base, k: new Float32Array(k.length + 3) })).toThrow(/'k'/);
    expect(() => ops.attentionForward({ ...base, v: new Float32Array(k.length + 16) })).toThrow(/'v'/);
    expect(() => ops.attentionForward({ ...base, out: new Float32Array(5) })).toThrow(/'out'/);
    expect(() => ops.attentionForward({ ...base, lse: new Float32Array(5) })).toThrow(/'lse'/);
    expect(() => ops.attentionForward({ ...base, tk: 4 })).toThrow(ArgumentError);
    expect(() => ops.attentionForward({ ...base, tk: 2 })).toThrow(/'tq'/);
    expect(() => ops.attentionForward({ ...base, headDim: 0 })).toThrow(/headDim/);
    expect(() => ops.attentionForward({ ...base, q: new Float64Array(q.length) as unknown as Float32Array })).toThrow(DTypeError);
    const f = ops.attentionForward(base);
    const bargs = { ...base, out: f.out, lse: f.lse, dout: f.out };
    expect(() => ops.attentionBackward(bargs)).not.toThrow();
    expect(() => ops.attentionBackward({ ...bargs, lse: new Float32Array(3) })).toThrow(/'lse'/);
    expect(() => ops.attentionBackward({ ...bargs, dout: new Float32Array(3) })).toThrow(ShapeError);
    expect(() => ops.attentionBackward({ ...bargs, k: new Float32Array(3) })).toThrow(/'k'/);
    expect(() => ops.attentionBackward({ ...bargs, dv: new Float32Array(3) })).toThrow(/'dv'/);
    expect(() => ops.attentionBackward({ ...bargs, heads: 3 })).toThrow(ArgumentError);
  });
});
