// PackedLoader, evalBatches, MixtureLoader: window contents against the token stream, epoch
// coverage, bit-exact resumption through a JSON round trip, mixture proportions.
import { describe, expect, it } from 'vitest';
import { ArgumentError, ShapeError } from '../../lib/errors.js';
import { corpusFromDocuments, type TokenCorpus } from '../../lib/data/tokens.js';
import { MixtureLoader, PackedLoader, evalBatches, windowCount, type LoaderState, type MixtureState } from '../../lib/data/loader.js';

/** A corpus whose token i is `base + i` (mod V), cut into documents of 50, so a window's position is readable from its ids. */
function rampCorpus(N: number, base = 0, V = 1 << 20): TokenCorpus {
  const docs: number[][] = [];
  for (let s = 0; s < N; s += 50) docs.push(Array.from({ length: Math.min(50, N - s) }, (_, j) => (base + s + j) % V));
  return corpusFromDocuments(docs, V);
}

const json = <T>(x: T): T => JSON.parse(JSON.stringify(x)) as T;

describe('PackedLoader', () => {
  it('rows are windows of T+1 tokens at stride T: inputs w[0..T), targets w[1..T+1)', () => {
    const N = 1000;
    const T = 16;
    const c = rampCorpus(N);
    const l = new PackedLoader(c, { T, seed: 1 });
    const W = Math.floor((N - 1) / T);
    expect(l.numWindows).toBe(W);
    expect(windowCount(N, T)).toBe(W);
    const b = l.next(4);
    expect(b.inputs.length).toBe(4 * T);
    for (let r = 0; r < 4; r++) {
      const s = b.inputs[r * T];
      expect(s % T).toBe(0); // starts on a window boundary
      for (let t = 0; t < T; t++) {
        expect(b.inputs[r * T + t]).toBe(c.tokens[s + t]);
        expect(b.targets[r * T + t]).toBe(c.tokens[s + t + 1]);
      }
    }
  });

  it('visits every window exactly once per epoch, in a new order each epoch; shuffle: false keeps stream order', () => {
    const T = 8;
    const c = rampCorpus(803); // W = 100
    const l = new PackedLoader(c, { T, seed: 5 });
    const epochs: number[][] = [];
    for (let e = 0; e < 3; e++) {
      const starts: number[] = [];
      for (let k = 0; k < 10; k++) {
        const b = l.next(10);
        for (let r = 0; r < 10; r++) starts.push(b.inputs[r * T] / T);
      }
      expect([...starts].sort((a, b) => a - b)).toEqual(Array.from({ length: 100 }, (_, i) => i));
      epochs.push(starts);
    }
    expect(epochs[0]).not.toEqual(epochs[1]);
    expect(epochs[1]).not.toEqual(epochs[2]);
    const ordered = new PackedLoader(c, { T, shuffle: false });
    const b = ordered.next(100);
    expect(Array.from({ length: 100 }, (_, r) => b.inputs[r * T] / T)).toEqual(Array.from({ length: 100 }, (_, i) => i));
    expect(ordered.next(1).inputs[0]).toBe(0); // epoch 2 starts over
    expect(ordered.epoch).toBe(1);
  });

  it('restore continues exactly: 5 batches, save (JSON), restore, next batches equal the uninterrupted run (across epochs)', () => {
    const c = rampCorpus(2000);
    const small = rampCorpus(300);
    for (const B of [3, 7]) {
      const T = 32; // W = 9: the state is saved in epoch 1 or 3, and the run crosses more epochs
      const a = new PackedLoader(small, { T, seed: 42 });
      for (let k = 0; k < 5; k++) a.next(B);
      const st = json(a.state());
      expect(st.epoch).toBeGreaterThan(0);
      expect(Object.keys(st).sort()).toEqual(['T', 'epoch', 'index', 'seed', 'shuffle', 'windows']);
      const uninterrupted = Array.from({ length: 30 }, () => a.next(B));
      const r = PackedLoader.restore(small, st);
      const resumed = Array.from({ length: 30 }, () => r.next(B));
      expect(resumed).toEqual(uninterrupted);
      expect(r.epoch).toBeGreaterThan(0);
    }
    // A state taken exactly at an epoch boundary (index === W) resumes too.
    const T = 10;
    const x = new PackedLoader(c, { T, seed: 3 });
    x.next(x.numWindows);
    const st = json(x.state());
    expect(st.index).toBe(x.numWindows);
    expect(PackedLoader.restore(c, st).next(5)).toEqual(x.next(5));
  });

  it('differs across seeds, fills caller arrays, and reports bad input', () => {
    const c = rampCorpus(500);
    expect(new PackedLoader(c, { T: 4, seed: 1 }).next(8)).not.toEqual(new PackedLoader(c, { T: 4, seed: 2 }).next(8));
    const out = { inputs: new Int32Array(8), targets: new Int32Array(8) };
    expect(new PackedLoader(c, { T: 4, seed: 1 }).next(2, out)).toBe(out);
    expect(out).toEqual(new PackedLoader(c, { T: 4, seed: 1 }).next(2));
    expect(() => new PackedLoader(c, { T: 4 }).next(3, out)).toThrow(ShapeError);
    expect(() => new PackedLoader(rampCorpus(16), { T: 16 })).toThrow(/T \+ 1 = 17 tokens are needed.*has 16/);
    expect(() => new PackedLoader(c, { T: 0 })).toThrow(ArgumentError);
    expect(() => new PackedLoader(c, { T: 4 }).next(0)).toThrow(/B must be a positive integer/);
    const st: LoaderState = new PackedLoader(c, { T: 4 }).state();
    expect(() => PackedLoader.restore(rampCorpus(600), st)).toThrow(/different corpus/);
    expect(() => PackedLoader.restore(c, { ...st, index: -1 })).toThrow(ArgumentError);
  });
});

describe('evalBatches', () => {
  it('visits every window once in order; every token after the first is a target exactly once', () => {
    const c = rampCorpus(1003);
    const T = 10;
    const B = 4;
    const seen: number[] = [];
    let count = 0;
    let firsts: number[] = [];
    for (const b of evalBatches(c, { T, B })) {
      firsts.push(b.firstWindow);
      expect(b.inputs.length).toBe(b.rows * T);
      for (let i = 0; i < b.rows * T; i++) {
        if (b.targets[i] === -100) continue;
        seen.push(b.targets[i]);
        expect(b.targets[i]).toBe(b.inputs[i] + 1); // ramp: target follows input
      }
      count += b.count;
    }
    expect(seen).toEqual(Array.from({ length: 1002 }, (_, i) => i + 1));
    expect(count).toBe(1002);
    expect(firsts).toEqual(Array.from({ length: Math.ceil(Math.ceil(1002 / T) / B) }, (_, k) => k * B));
    firsts = [];
    let full = 0;
    for (const b of evalBatches(c, { T, B, partial: false })) full += b.rows;
    expect(full).toBe(windowCount(1003, T));
    expect(() => [...evalBatches(rampCorpus(1), { T, B })]).toThrow(/at least 2 tokens/);
  });
});

describe('MixtureLoader', () => {
  // Disjoint id ranges per domain: a row's ids tell its domain.
  const corpora: Record<string, TokenCorpus> = {
    code: rampCorpus(3000, 0, 40000),
    math: rampCorpus(3000, 10000, 40000),
    multilingual: rampCorpus(3000, 20000, 40000),
    general: rampCorpus(9000, 30000, 40000),
  };
  const weights = { code: 0.15, math: 0.15, multilingual: 0.15, general: 0.55 };
  const T = 16;
  const make = (seed = 1): MixtureLoader =>
    new MixtureLoader(
      Object.fromEntries(Object.entries(corpora).map(([k, c], i) => [k, new PackedLoader(c, { T, seed: 100 + i })])),
      weights,
      { seed },
    );
  const domainOf = (id: number): string => ['code', 'math', 'multilingual', 'general'][Math.floor(id / 10000)];

  it('draws rows with the given proportions and labels each row with its domain', () => {
    const m = make();
    const counts: Record<string, number> = { code: 0, math: 0, multilingual: 0, general: 0 };
    const n = 200;
    const B = 50;
    let mismatches = 0;
    for (let k = 0; k < n; k++) {
      const b = m.next(B);
      for (let r = 0; r < B; r++) {
        const d = domainOf(b.inputs[r * T]);
        if (b.domains[r] !== d) mismatches++;
        for (let t = 0; t < T; t++) if (domainOf(b.targets[r * T + t]) !== d || domainOf(b.inputs[r * T + t]) !== d) mismatches++;
        counts[d]++;
      }
    }
    expect(mismatches).toBe(0);
    const total = n * B;
    for (const [d, w] of Object.entries(weights)) {
      const sd = Math.sqrt(total * w * (1 - w));
      expect(Math.abs(counts[d] - total * w)).toBeLessThan(5 * sd);
    }
  });

  it('restore (state through JSON) continues exactly, members included', () => {
    const a = make(7);
    for (let k = 0; k < 5; k++) a.next(9);
    const st = json(a.state());
    const uninterrupted = Array.from({ length: 40 }, () => a.next(9));
    const r = MixtureLoader.restore(corpora, st as MixtureState);
    expect(Array.from({ length: 40 }, () => r.next(9))).toEqual(uninterrupted);
    expect(make(7).next(9)).not.toEqual(make(8).next(9));
  });

  it('never draws a zero-weight domain, and validates its inputs', () => {
    const m = new MixtureLoader({ a: new PackedLoader(corpora.code, { T }), b: new PackedLoader(corpora.math, { T }) }, { a: 0, b: 2 }, { seed: 3 });
    expect(m.weights).toEqual([0, 1]);
    for (let k = 0; k < 20; k++) expect(new Set(m.next(10).domains)).toEqual(new Set(['b']));
    const p = new PackedLoader(corpora.code, { T });
    expect(() => new MixtureLoader({ a: p }, { a: 0 })).toThrow(/sum to 0/);
    expect(() => new MixtureLoader({ a: p }, { a: 1, z: 1 })).toThrow(/"z" has no loader/);
    expect(() => new MixtureLoader({ a: p }, { a: -1 })).toThrow(/weights\["a"\]/);
    expect(() => new MixtureLoader({ a: p, b: new PackedLoader(corpora.math, { T: 8 }) }, { a: 1, b: 1 })).toThrow(/T = 8/);
    expect(() => MixtureLoader.restore({ code: corpora.code }, json(make().state()))).toThrow(/no corpus given for domain "math"/);
  });
});
