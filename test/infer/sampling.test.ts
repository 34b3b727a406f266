// Sampler, argmax, logSoftmax: checked against brute-force references written here (full sorts,
// float64 softmax), and empirically (20k draws against the filtered distribution).
import { describe, expect, it } from 'vitest';
import { ArgumentError, DTypeError, ShapeError, TokenRangeError } from '../../lib/errors.js';
import { Sampler, argmax, logSoftmax, type SamplingOptions } from '../../lib/infer/sampling.js';
import { rng } from '../helpers.js';


/** Random logits with a spread like a model's: N(0, scale^2)-ish via sum of uniforms. */
function randomLogits(V: number, seed: number, scale = 3): Float32Array {
  const r = rng(seed);
  const a = new Float32Array(V);
  for (let i = 0; i < V; i++) a[i] = (r() + r() + r() - 1.5) * 2 * scale;
  return a;
}

/** Brute force: the filtered, renormalized distribution by the documented recipe, with full sorts. */
function reference(logits: ArrayLike<number>, o: SamplingOptions, history: number[] = []): Float64Array {
  const V = logits.length;
  const l = Array.from(logits, Number);
  const r = o.repetitionPenalty ?? 1;
  for (const id of new Set(history)) l[id] = l[id] > 0 ? l[id] / r : l[id] * r;
  const out = new Float64Array(V);
  const T = o.temperature ?? 1;
  if (T === 0) {
    out[l.indexOf(Math.max(...l))] = 1;
    return out;
  }
  const m = Math.max(...l);
  const p = l.map((x) => Math.exp((x - m) / T));
  let order = [...p.keys()].sort((a, b) => p[b] - p[a] || a - b).filter((i) => p[i] > 0);
  const k = o.topK ?? 0;
  if (k > 0) order = order.slice(0, k);
  const topP = o.topP ?? 1;
  if (topP < 1) {
    const mass = order.reduce((s, i) => s + p[i], 0);
    let acc = 0;
    let n = 0;
    while (n < order.length) {
      acc += p[order[n++]];
      if (acc >= topP * mass) break;
    }
    order = order.slice(0, n);
  }
  const minP = o.minP ?? 0;
  if (minP > 0) {
    const top = Math.max(...order.map((i) => p[i]));
    order = order.filter((i) => p[i] >= minP * top);
  }
  const z = order.reduce((s, i) => s + p[i], 0);
  for (const i of order) out[i] = p[i] / z;
  return out;
}

function expectClose(a: Float64Array, b: Float64Array, tol: number): void {
  expect(a.length).toBe(b.length);
  let worst = 0;
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i] - b[i]));
  expect(worst).toBeLessThanOrEqual(tol);
}

describe('argmax', () => {
  it('matches a plain scan, lowest id on ties, honours offset and vocab', () => {
    for (let s = 0; s < 20; s++) {
      const x = randomLogits(257, s);
      const ref = Array.from(x).indexOf(Math.max(...x));
      expect(argmax(x)).toBe(ref);
    }
    const tied = new Float32Array([1, 5, 3, 5, 5]);
    expect(argmax(tied)).toBe(1);
    const rows = new Float32Array([9, 0, 0, /* row 1: */ 1, 7, 7]);
    expect(argmax(rows, 3, 3)).toBe(1);
    expect(argmax(rows, 0, 2)).toBe(0);
    expect(argmax(new Float32Array([-Infinity, -Infinity]))).toBe(0);
  });
  it('rejects NaN (naming the position) and bad ranges', () => {
    expect(() => argmax(new Float32Array([0, NaN, 1]))).toThrow(/logits\[1\].*NaN/);
    expect(() => argmax(new Float32Array([0, 1, NaN]), 1, 2)).toThrow(ArgumentError);
    expect(() => argmax(new Float32Array(3), 0, 4)).toThrow(ShapeError);
    expect(() => argmax(new Float32Array(3), -1)).toThrow(ShapeError);
    expect(() => argmax([1, 2] as unknown as Float32Array)).toThrow(DTypeError);
  });
});

describe('logSoftmax', () => {
  it('equals l - logsumexp(l) computed in float64, and exponentiates to a distribution', () => {
    for (const V of [1, 2, 31, 1000]) {
      const x = randomLogits(V + 5, V, 10);
      const out = logSoftmax(x, 5, V);
      const row = Array.from(x.subarray(5));
      const lse = Math.log(row.reduce((s, v) => s + Math.exp(v), 0));
      row.forEach((v, i) => expect(out[i]).toBeCloseTo(v - lse, 5));
      expect(Array.from(out).reduce((s, v) => s + Math.exp(v), 0)).toBeCloseTo(1, 5);
    }
  });
  it('is stable for huge logits, handles -Inf and +Inf, writes into out', () => {
    const out = new Float32Array(4);
    const r = logSoftmax(new Float32Array([1000, 1000, -Infinity, 999]), 0, 4, out);
    expect(r).toBe(out);
    const lse = 1000 + Math.log(2 + Math.exp(-1));
    expect(out[0]).toBeCloseTo(1000 - lse, 5);
    expect(out[2]).toBe(-Infinity);
    expect(Array.from(logSoftmax(new Float32Array([Infinity, 0, Infinity])))).toEqual([-Math.log(2), -Infinity, -Math.log(2)].map(Math.fround));
    expect(() => logSoftmax(new Float32Array([-Infinity, -Infinity]))).toThrow(/all 2 logits are -Inf/);
    expect(() => logSoftmax(new Float32Array([0, NaN]))).toThrow(/logits\[1\]/);
    expect(() => logSoftmax(new Float32Array(4), 0, 4, new Float32Array(3))).toThrow(ShapeError);
  });
});

describe('Sampler options', () => {
  const bad: [SamplingOptions, string][] = [
    [{ temperature: -1 }, 'temperature'],
    [{ temperature: NaN }, 'temperature'],
    [{ temperature: Infinity }, 'temperature'],
    [{ topK: 1.5 }, 'topK'],
    [{ topK: -1 }, 'topK'],
    [{ topP: 0 }, 'topP'],
    [{ topP: 1.01 }, 'topP'],
    [{ minP: -0.1 }, 'minP'],
    [{ minP: 2 }, 'minP'],
    [{ repetitionPenalty: 0 }, 'repetitionPenalty'],
    [{ seed: 0.5 }, 'seed'],
    [{ temperature: '1' as unknown as number }, 'temperature'],
  ];
  for (const [o, name] of bad) {
    it(`rejects ${JSON.stringify(o)} naming ${name}`, () => {
      expect(() => new Sampler(o)).toThrow(ArgumentError);
      expect(() => new Sampler(o)).toThrow(new RegExp(`option ${name}`));
    });
  }
  it('has documented defaults', () => {
    const s = new Sampler({});
    expect([s.temperature, s.topK, s.topP, s.minP, s.repetitionPenalty]).toEqual([1, 0, 1, 0, 1]);
    expect(Number.isSafeInteger(s.seed)).toBe(true);
  });
});

describe('Sampler', () => {
  it('greedy (temperature 0) returns argmax, lowest id on ties, and applies the penalty first', () => {
    const g = new Sampler({ temperature: 0, seed: 1 });
    for (let s = 0; s < 30; s++) {
      const x = randomLogits(500, 100 + s);
      expect(g.sample(x)).toBe(argmax(x));
    }
    expect(g.sample(new Float32Array([0, 3, 1, 3]))).toBe(1);
    // Penalty 2 on id 1 (logit 3 -> 1.5) makes id 3 the argmax.
    expect(new Sampler({ temperature: 0, repetitionPenalty: 2 }).sample(new Float32Array([0, 3, 1, 2]), 0, 4, [1, 1])).toBe(3);
  });

  it('top-k = 1 is greedy for any temperature and seed', () => {
    for (let s = 0; s < 30; s++) {
      const x = randomLogits(300, 200 + s);
      const smp = new Sampler({ topK: 1, temperature: 1 + s, seed: s });
      for (let j = 0; j < 5; j++) expect(smp.sample(x)).toBe(argmax(x));
    }
    const ties = new Float32Array([1, 2, 2, 2]);
    expect(new Sampler({ topK: 1, seed: 3 }).sample(ties)).toBe(1);
  });

  it('temperature -> 0 behaves as greedy (and never produces NaN)', () => {
    for (const T of [1e-3, 1e-8, 1e-30, 1e-300]) {
      for (let s = 0; s < 10; s++) {
        const x = randomLogits(1000, 300 + s);
        const smp = new Sampler({ temperature: T, seed: s });
        expect(smp.sample(x)).toBe(argmax(x));
        const p = smp.probabilities(x);
        expect(p[argmax(x)]).toBeCloseTo(1, 12);
      }
    }
  });

  it('top-p keeps the smallest set whose mass >= p (brute force), with and without top-k / min-p', () => {
    const cases: SamplingOptions[] = [
      { topP: 0.5 },
      { topP: 0.9 },
      { topP: 0.999 },
      { topP: 0.01 },
      { topP: 0.9, temperature: 0.7 },
      { topP: 0.8, topK: 40 },
      { topK: 7 },
      { minP: 0.05 },
      { minP: 0.2, topP: 0.95, topK: 100, temperature: 1.3 },
      { repetitionPenalty: 1.3, topP: 0.9 },
    ];
    for (const o of cases) {
      for (const V of [1, 2, 17, 1000, 8000]) {
        const x = randomLogits(V, V * 7 + (o.topK ?? 3), 2);
        const hist = V > 3 ? [0, 1, 1, V - 1, 2] : [];
        const smp = new Sampler({ ...o, seed: 5 });
        const got = smp.probabilities(x, 0, V, hist);
        const ref = reference(x, o, o.repetitionPenalty ? hist : []);
        expectClose(got, ref, 1e-9);
        // The kept set is exactly the reference's.
        for (let i = 0; i < V; i++) expect(got[i] > 0).toBe(ref[i] > 0);
      }
    }
  });

  it('top-p and top-k resolve ties by lowest id', () => {
    const flat = new Float32Array(10); // uniform: top-p 0.35 needs 4 tokens (0.4 >= 0.35), the lowest ids
    const p = new Sampler({ topP: 0.35 }).probabilities(flat);
    expect(Array.from(p, (v) => (v > 0 ? 1 : 0))).toEqual([1, 1, 1, 1, 0, 0, 0, 0, 0, 0]);
    const k = new Sampler({ topK: 3 }).probabilities(flat);
    expect(Array.from(k, (v) => (v > 0 ? 1 : 0))).toEqual([1, 1, 1, 0, 0, 0, 0, 0, 0, 0]);
  });

  it('empirical frequencies over 20k samples match the filtered softmax (chi-square)', () => {
    const V = 60;
    const x = randomLogits(V, 42, 1.5);
    for (const o of [{ temperature: 0.8, topK: 25, topP: 0.9 }, { minP: 0.1 }, { repetitionPenalty: 1.5 }] as SamplingOptions[]) {
      const hist = [3, 4, 5];
      const ref = reference(x, o, o.repetitionPenalty ? hist : []);
      const smp = new Sampler({ ...o, seed: 12345 });
      const N = 20_000;
      const count = new Float64Array(V);
      for (let n = 0; n < N; n++) count[smp.sample(x, 0, V, hist)]++;
      let chi2 = 0;
      let df = -1;
      for (let i = 0; i < V; i++) {
        if (ref[i] === 0) {
          expect(count[i]).toBe(0); // filtered tokens never appear
          continue;
        }
        df++;
        const e = N * ref[i];
        chi2 += ((count[i] - e) * (count[i] - e)) / e;
      }
      // chi2 has mean df and sd sqrt(2 df); this bound is far in the tail (p < 1e-6) for df <= 60.
      expect(chi2).toBeLessThan(df + 8 * Math.sqrt(2 * df) + 10);
      // And the unfiltered softmax is clearly rejected when filtering removed something.
      const full = reference(x, {});
      if (ref.some((v, i) => v === 0 && full[i] > 1e-3)) {
        let chiFull = 0;
        for (let i = 0; i < V; i++) chiFull += ((count[i] - N * full[i]) ** 2) / (N * full[i]);
        expect(chiFull).toBeGreaterThan(df + 8 * Math.sqrt(2 * df) + 10);
      }
    }
  });

  it('is deterministic for a seed, differs across seeds, and does not touch the logits', () => {
    const x = randomLogits(5000, 9, 1);
    const copy = x.slice();
    const draw = (seed: number): number[] => {
      const s = new Sampler({ seed, topP: 0.95, repetitionPenalty: 1.1 });
      return Array.from({ length: 200 }, (_, i) => s.sample(x, 0, x.length, [i % 50]));
    };
    expect(draw(7)).toEqual(draw(7));
    expect(draw(7)).not.toEqual(draw(8));
    expect(x).toEqual(copy);
  });

  it('samples rows at an offset of a [B, V] buffer', () => {
    const V = 100;
    const rows = new Float32Array(3 * V).fill(-Infinity);
    rows[0 * V + 5] = 0;
    rows[1 * V + 42] = 0;
    rows[2 * V + 99] = 0;
    const s = new Sampler({ seed: 1 });
    expect([0, 1, 2].map((b) => s.sample(rows, b * V, V))).toEqual([5, 42, 99]);
  });

  it('handles -Inf (masked), +Inf (takes all mass), NaN and all -Inf', () => {
    const s = new Sampler({ seed: 2 });
    const masked = new Float32Array([-Infinity, 0, -Infinity, 0]);
    for (let i = 0; i < 100; i++) expect([1, 3]).toContain(s.sample(masked));
    const inf = new Float32Array([0, Infinity, 5, Infinity]);
    const seen = new Set<number>();
    for (let i = 0; i < 100; i++) seen.add(s.sample(inf));
    expect([...seen].sort()).toEqual([1, 3]);
    expect(Array.from(s.probabilities(inf))).toEqual([0, 0.5, 0, 0.5]);
    expect(new Sampler({ temperature: 0 }).sample(inf)).toBe(1);
    expect(() => s.sample(new Float32Array([0, 1, NaN]))).toThrow(/logits\[2\] \(token id 2\) is NaN/);
    expect(() => s.sample(new Float32Array([0, 1, 2, NaN]), 2, 2)).toThrow(/logits\[3\] \(token id 1\)/);
    expect(() => s.sample(new Float32Array([-Infinity, -Infinity]))).toThrow(/all 2 logits are -Inf/);
  });

  it('validates history ids and buffer ranges', () => {
    const s = new Sampler({ repetitionPenalty: 1.2 });
    expect(() => s.sample(new Float32Array(4), 0, 4, [0, 4])).toThrow(TokenRangeError);
    expect(() => s.sample(new Float32Array(4), 0, 4, [0, -1])).toThrow(/history\[1\] = -1/);
    // A failed call leaves no marks behind: the next call penalizes id 0 once, as the reference does.
    const x = new Float32Array([2, 1, 0.5, -1]);
    expectClose(s.probabilities(x, 0, 4, [0, 0]), reference(x, { repetitionPenalty: 1.2 }, [0]), 1e-12);
    expect(() => s.sample(new Float32Array(4), 2, 3)).toThrow(ShapeError);
    expect(() => s.sample(new Float64Array(4) as unknown as Float32Array)).toThrow(DTypeError);
  });

  it('repetition penalty follows HF (divide positive, multiply negative, once per distinct id)', () => {
    const x = new Float32Array([2, -2, 0.5, 1]);
    const p = new Sampler({ repetitionPenalty: 2 }).probabilities(x, 0, 4, [0, 1, 1, 1]);
    const l = [1, -4, 0.5, 1];
    const z = l.reduce((s, v) => s + Math.exp(v), 0);
    expectClose(p, Float64Array.from(l, (v) => Math.exp(v) / z), 1e-12);
  });
});
