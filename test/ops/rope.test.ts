import { describe, expect, it } from 'vitest';
import { ops, ArgumentError, BtsError, ShapeError, DTypeError } from '../../lib/index.js';
import { atLevel, dot, fastLevels, randn, relErr } from '../helpers.js';

const f = Math.fround;

/** transformers' default inv_freq + `_compute_llama3_parameters`, op by op in fp32 (torch semantics). */
function hfInvFreq(Dh: number, theta: number, s?: { factor: number; low: number; high: number; orig: number }): number[] {
  const inv: number[] = [];
  for (let i = 0; i < Dh / 2; i++) inv.push(f(1 / f(Math.pow(f(theta), f(f(2 * i) / f(Dh))))));
  if (!s) return inv;
  const lowWl = s.orig / s.low;
  const highWl = s.orig / s.high;
  return inv.map((x) => {
    const wl = f(f(1 / x) * f(2 * Math.PI)); // 2*pi / inv_freq == inv_freq.reciprocal() * 2pi
    if (wl > f(lowWl)) return f(x / f(s.factor));
    if (wl < f(highWl)) return x;
    const smooth = f(f(f(f(1 / wl) * f(s.orig)) - f(s.low)) / f(s.high - s.low));
    return f(f(f(f(1 - smooth) * x) / f(s.factor)) + f(smooth * x));
  });
}

/** HF apply_rotary_pos_emb on one head: x*cos + rotate_half(x)*sin, cos/sin = cat(freqs, freqs). */
function hfRotate(x: ArrayLike<number>, pos: number, inv: number[]): number[] {
  const half = inv.length;
  const out: number[] = [];
  for (let j = 0; j < 2 * half; j++) {
    const a = f(pos * inv[j % half]);
    const rot = j < half ? -x[j + half] : x[j - half];
    out.push(x[j] * Math.cos(a) + rot * Math.sin(a));
  }
  return out;
}

function posArray(N: number, P: number, seed: number): Int32Array {
  const r = randn(N, seed, 0, P);
  return Int32Array.from(r, (v) => Math.min(P - 1, Math.floor(v)));
}

describe('rope', () => {
  it('table matches transformers (plain RoPE): inv_freq and cos/sin of the fp32 angle', () => {
    for (const [Dh, theta] of [[8, 10000], [64, 500000], [6, 10000]] as const) {
      const P = 37;
      const { table, invFreq } = ops.ropeTable({ positions: P, headDim: Dh, theta });
      const ref = hfInvFreq(Dh, theta);
      expect(relErr(invFreq, ref)).toBeLessThan(2e-7);
      let worst = 0;
      for (let p = 0; p < P; p++)
        for (let i = 0; i < Dh / 2; i++) {
          const a = f(p * invFreq[i]);
          worst = Math.max(worst, Math.abs(table[p * Dh + 2 * i] - Math.cos(a)), Math.abs(table[p * Dh + 2 * i + 1] - Math.sin(a)));
        }
      expect(worst).toBeLessThan(1e-7); // fp32 rounding of cos/sin (|value| <= 1)
    }
  });

  it('llama3 scaling matches the transformers formula (factor 8, low 1, high 4, orig 8192, theta 5e5, Dh 64)', () => {
    const Dh = 64;
    const scaling = { factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 };
    const { invFreq } = ops.ropeTable({ positions: 4, headDim: Dh, theta: 500000, scaling });
    const plain = hfInvFreq(Dh, 500000);
    const ref = hfInvFreq(Dh, 500000, { factor: 8, low: 1, high: 4, orig: 8192 });
    for (let i = 0; i < Dh / 2; i++) expect(Math.abs(invFreq[i] - ref[i]) / ref[i], `i=${i}`).toBeLessThan(3e-7);
    // Hand-checked properties: wavelength 2*pi/inv < 8192/4 keeps the frequency; > 8192/1 divides by 8;
    // in between it is a blend, strictly between the two.
    let kept = 0, divided = 0, blended = 0;
    for (let i = 0; i < Dh / 2; i++) {
      const wl = (2 * Math.PI) / plain[i];
      if (wl < 2048) {
        expect(invFreq[i]).toBe(plain[i]);
        kept++;
      } else if (wl > 8192) {
        expect(invFreq[i]).toBe(f(plain[i] / 8));
        divided++;
      } else {
        expect(invFreq[i]).toBeLessThan(plain[i]);
        expect(invFreq[i]).toBeGreaterThan(plain[i] / 8);
        blended++;
      }
    }
    expect(invFreq[0]).toBe(1); // theta^0
    expect(invFreq[Dh / 2 - 1]).toBe(f(plain[Dh / 2 - 1] / 8)); // lowest frequency divided by the factor
    expect(kept).toBeGreaterThan(0);
    expect(divided).toBeGreaterThan(0);
    expect(blended).toBeGreaterThan(0);
  });

  it('reference rotation matches the HF rotate-half formula', () => {
    const [N, nh, Dh, P] = [3, 2, 8, 16];
    const { table, invFreq } = ops.ropeTable({ positions: P, headDim: Dh });
    const x = randn(N * nh * Dh, 1);
    const pos = Int32Array.from([0, 5, 15]);
    const { out } = atLevel('reference', () => ops.ropeForward({ x, pos, table, headDim: Dh }));
    const inv = Array.from(invFreq);
    for (let n = 0; n < N; n++)
      for (let h = 0; h < nh; h++) {
        const o = (n * nh + h) * Dh;
        const want = hfRotate(x.subarray(o, o + Dh), pos[n], inv);
        for (let j = 0; j < Dh; j++) expect(out[o + j]).toBeCloseTo(want[j], 6);
      }
  });

  it('table is identical at every level', () => {
    const scaling = { factor: 8 };
    const ref = atLevel('reference', () => ops.ropeTable({ positions: 300, headDim: 128, theta: 500000, scaling }));
    for (const level of fastLevels()) {
      const got = atLevel(level, () => ops.ropeTable({ positions: 300, headDim: 128, theta: 500000, scaling }));
      expect(Array.from(got.table)).toEqual(Array.from(ref.table));
      expect(Array.from(got.invFreq)).toEqual(Array.from(ref.invFreq));
    }
  });

  for (const level of fastLevels()) {
    it(`forward and inverse match the reference at ${level}`, () => {
      for (const [N, nh, Dh] of [[1, 1, 2], [7, 3, 14], [33, 2, 34], [5, 4, 64], [3, 1, 130], [17, 2, 6]]) {
        const P = 50;
        const { table } = ops.ropeTable({ positions: P, headDim: Dh, theta: 10000 });
        const x = randn(N * nh * Dh, N * 7 + Dh, -2, 2);
        const pos = posArray(N, P, N + Dh);
        for (const inverse of [false, true]) {
          const ref = atLevel('reference', () => ops.ropeForward({ x, pos, table, headDim: Dh, inverse }).out);
          const got = atLevel(level, () => ops.ropeForward({ x, pos, table, headDim: Dh, inverse }).out);
          expect(relErr(got, ref), `${N}x${nh}x${Dh} inverse=${inverse}`).toBeLessThan(1e-6);
        }
      }
    });
  }

  for (const level of ['reference' as const, ...fastLevels()]) {
    it(`strided in-place rotation of q and k inside a fused qkv buffer at ${level}`, () => {
      const [N, nq, nkv, Dh, P] = [9, 4, 2, 18, 20];
      const row = (nq + 2 * nkv) * Dh;
      const qkv = randn(N * row, 3);
      const orig = qkv.slice();
      const pos = posArray(N, P, 4);
      const { table } = ops.ropeTable({ positions: P, headDim: Dh });
      atLevel(level, () => {
        const q = qkv.subarray(0);
        ops.ropeForward({ x: q, out: q, pos, table, heads: nq, headDim: Dh, ldX: row });
        const k = qkv.subarray(nq * Dh);
        ops.ropeForward({ x: k, out: k, pos, table, heads: nkv, headDim: Dh, ldX: row });
        // Expected: rotate packed copies.
        const pack = (off: number, nh: number) => {
          const a = new Float32Array(N * nh * Dh);
          for (let n = 0; n < N; n++) a.set(orig.subarray(n * row + off, n * row + off + nh * Dh), n * nh * Dh);
          return ops.ropeForward({ x: a, pos, table, headDim: Dh }).out;
        };
        const wq = pack(0, nq);
        const wk = pack(nq * Dh, nkv);
        for (let n = 0; n < N; n++) {
          for (let j = 0; j < nq * Dh; j++) expect(qkv[n * row + j]).toBe(wq[n * nq * Dh + j]);
          for (let j = 0; j < nkv * Dh; j++) expect(qkv[n * row + nq * Dh + j]).toBe(wk[n * nkv * Dh + j]);
          for (let j = (nq + nkv) * Dh; j < row; j++) expect(qkv[n * row + j]).toBe(orig[n * row + j]); // v untouched
        }
        // Strided out, packed in.
        const ld = nq * Dh + 5;
        const outStrided = new Float32Array((N - 1) * ld + nq * Dh).fill(7);
        ops.ropeForward({ x: wq, out: outStrided, pos, table, heads: nq, headDim: Dh, ldOut: ld, inverse: true });
        for (let n = 0; n < N; n++) {
          for (let j = 0; j < nq * Dh; j++) expect(outStrided[n * ld + j]).toBeCloseTo(orig[n * row + j], 5);
          for (let j = nq * Dh; j < ld && n * ld + j < outStrided.length; j++) expect(outStrided[n * ld + j]).toBe(7);
        }
      });
    });
  }

  for (const level of ['reference' as const, ...fastLevels()]) {
    it(`inverse undoes forward and is the adjoint (<Rx, y> = <x, R^T y>) at ${level}`, () => {
      const [N, nh, Dh, P] = [13, 3, 22, 4096];
      const { table } = ops.ropeTable({ positions: P, headDim: Dh, theta: 500000, scaling: { factor: 8 } });
      const x = randn(N * nh * Dh, 5);
      const y = randn(N * nh * Dh, 6);
      const pos = posArray(N, P, 7);
      atLevel(level, () => {
        const rx = ops.ropeForward({ x, pos, table, headDim: Dh }).out;
        const back = ops.ropeForward({ x: rx, pos, table, headDim: Dh, inverse: true }).out;
        expect(relErr(back, x)).toBeLessThan(1e-6);
        const rty = ops.ropeForward({ x: y, pos, table, headDim: Dh, inverse: true }).out;
        const a = dot(rx, y);
        const b = dot(x, rty);
        expect(Math.abs(a - b) / Math.sqrt(dot(x, x) * dot(y, y))).toBeLessThan(1e-6);
        // The rotation preserves each head's norm.
        expect(Math.abs(dot(rx, rx) - dot(x, x)) / dot(x, x)).toBeLessThan(1e-6);
      });
    });
  }

  it('async forms give the same results', async () => {
    const a = ops.ropeTable({ positions: 64, headDim: 16, theta: 500000 });
    const b = await ops.ropeTableAsync({ positions: 64, headDim: 16, theta: 500000 });
    expect(Array.from(b.table)).toEqual(Array.from(a.table));
    const x = randn(10 * 2 * 16, 9);
    const pos = posArray(10, 64, 10);
    const s = ops.ropeForward({ x, pos, table: a.table, headDim: 16 });
    const t = await ops.ropeForwardAsync({ x, pos, table: a.table, headDim: 16 });
    expect(Array.from(t.out)).toEqual(Array.from(s.out));
  });

  it('rejects bad arguments with typed errors naming them', () => {
    const { table } = ops.ropeTable({ positions: 8, headDim: 4 });
    const x = new Float32Array(3 * 4);
    expect(() => ops.ropeTable({ positions: 8, headDim: 5 })).toThrow(ArgumentError);
    expect(() => ops.ropeTable({ positions: 8, headDim: 5 })).toThrow(/'headDim'/);
    expect(() => ops.ropeForward({ x, pos: Int32Array.from([0, 1, 2]), table, headDim: 3 })).toThrow(/'headDim'/);
    expect(() => ops.ropeTable({ positions: 8, headDim: 4, scaling: { factor: 8, lowFreqFactor: 4, highFreqFactor: 1 } })).toThrow(
      /highFreqFactor/,
    );
    // Out-of-range positions are caught natively, naming 'pos' and the index.
    for (const bad of [8, -1]) {
      try {
        ops.ropeForward({ x, pos: Int32Array.from([0, 1, bad]), table, headDim: 4 });
        expect.unreachable();
      } catch (e) {
        expect(e).toBeInstanceOf(BtsError);
        expect((e as BtsError).code).toBe('E_ARGUMENT');
        expect((e as Error).message).toMatch(/'pos'\[2\]/);
      }
    }
    expect(() => ops.ropeForward({ x, pos: Int32Array.from([0, 1]), table, headDim: 4 })).toThrow(ShapeError);
    expect(() => ops.ropeForward({ x, pos: Int32Array.from([0, 1, 2]), table: new Float32Array(6), headDim: 4 })).toThrow(/'table'/);
    expect(() => ops.ropeForward({ x, pos: Int32Array.from([0, 1, 2]), table, headDim: 4, heads: 1, ldX: 5 })).toThrow(/'x'/);
    expect(() => ops.ropeForward({ x, pos: Int32Array.from([0, 1, 2]), table, headDim: 4, heads: 1, ldX: 3 })).toThrow(/'ldX'/);
    expect(() => ops.ropeForward({ x, pos: Float32Array.from([0, 1, 2]) as unknown as Int32Array, table, headDim: 4 })).toThrow(DTypeError);
    expect(() => ops.ropeForward({ x, pos: Int32Array.from([0, 1, 2]), table, headDim: 4, out: new Float32Array(5) })).toThrow(/'out'/);
  });
});
