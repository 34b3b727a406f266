/**
 * Next-token sampling from a row of logits: greedy, temperature, top-k, top-p (nucleus), min-p and
 * the Hugging Face repetition penalty, deterministic for a seed. Pure TypeScript: one row of V
 * logits per generated token is small work next to the forward pass that produced it.
 *
 * Order of the transforms (that of HF transformers' `generate`: processors, then warpers):
 * 1. repetition penalty over the ids in `history` (each distinct id once): a logit l becomes l / r
 *    when l > 0 and l * r otherwise (so r > 1 makes repeated tokens less likely);
 * 2. temperature: weights w_i = exp((l_i - max l) / temperature), i.e. softmax(l / temperature) up
 *    to a constant (subtracting the max first keeps tiny temperatures finite: as temperature -> 0
 *    the distribution tends to the argmax, which is what temperature 0 returns exactly);
 * 3. top-k: keep the k largest weights;
 * 4. top-p: of those, keep the smallest set whose probability mass (renormalized over what is
 *    left) is >= p, taking the most likely tokens first;
 * 5. min-p: keep tokens whose probability is >= minP times that of the most likely token;
 * 6. draw one token from what is left, in proportion to its weight.
 * All orderings are total: by value descending (the penalized logit for greedy and top-k, the
 * weight for top-p: the same order, exp being monotone), then by id ascending, so ties always
 * resolve to the lowest id and the kept sets are well defined.
 *
 * How it is computed: logits are copied into a scratch row (the caller's array is never modified),
 * candidate ids live in a scratch Int32Array, and top-k / top-p are selections, not sorts. Top-k
 * runs on the logits before any exp (exp is monotone; it is the costly part of a row, ~15 ns per
 * call in V8), with one pass through a bounded min-heap for k <= 1024 and a quickselect beyond.
 * Top-p is a quickselect that tracks the mass of the better side: O(V) expected. Scratch buffers
 * grow to the largest V seen and are reused: no allocation per call.
 *
 * Cost, V = 128256 (Llama 3), one core of a busy 2-core machine: greedy ~0.6 ms, plain sampling
 * ~3.5 ms (mostly Math.exp), top-k 40 ~1.5-2 ms, top-p 0.9 alone ~7 ms (timings are rough: the
 * machine was shared; bench them before relying on them).
 *
 * Randomness: {@link Rng} (PCG32, ../util/random.ts), one 53-bit uniform per sampled token (none for
 * greedy). The same seed and the same sequence of calls give the same tokens on every platform.
 *
 * Special values: a NaN logit is an error naming its position (it means the model is broken; a
 * sample from it would be silently meaningless). -Inf logits have probability 0 (masking). +Inf
 * logits take all the mass, shared equally among them (the limit of a huge logit). A row with no
 * finite or +Inf logit (all -Inf, after penalty) is an error.
 *
 * Known limits: one row per call (batch generation calls it per row); weights are float64, so
 * probabilities below ~1e-308 relative to the top token count as 0.
 */
import { ArgumentError, DTypeError, ShapeError, TokenRangeError } from '../errors.js';
import { Rng } from '../util/random.js';

/** Options of {@link Sampler}. Every option is validated; an invalid one is an ArgumentError naming it. */
export interface SamplingOptions {
  /** Softmax temperature, >= 0. 0 means greedy (argmax, lowest id on ties). Default 1. */
  temperature?: number;
  /** Keep only the k most likely tokens; integer >= 0, 0 = off. Default 0. */
  topK?: number;
  /** Nucleus sampling: keep the smallest set of most likely tokens whose mass is >= topP; in (0, 1], 1 = off. Default 1. */
  topP?: number;
  /** Drop tokens whose probability is below minP times the top token's; in [0, 1], 0 = off. Default 0. */
  minP?: number;
  /** HF repetition penalty over `history` (positive logits divided, others multiplied); > 0, 1 = off. Default 1. */
  repetitionPenalty?: number;
  /** Seed of the generator (any safe integer). Default: a random seed, readable as {@link Sampler.seed}. */
  seed?: number;
}

/** Largest vocabulary the scratch buffers are sized for without complaint (they grow beyond it too). */
const SCRATCH_HINT = 1 << 20;
/** Top-k up to this k uses a bounded heap (one pass), larger k quickselect. */
const HEAP_K_MAX = 1024;

function checkRow(fn: string, logits: Float32Array, offset: number, vocab: number): void {
  if (!(logits instanceof Float32Array)) {
    throw new DTypeError(`${fn}: logits must be a Float32Array, got ${(logits as object)?.constructor?.name ?? typeof logits}`);
  }
  if (!Number.isSafeInteger(offset) || offset < 0 || offset > logits.length) {
    throw new ShapeError(`${fn}: offset must be an integer in [0, ${logits.length}], got ${offset}`);
  }
  if (!Number.isSafeInteger(vocab) || vocab < 1 || offset + vocab > logits.length) {
    throw new ShapeError(`${fn}: vocab must be an integer in [1, ${logits.length - offset}] (logits.length ${logits.length} - offset ${offset}), got ${vocab}`);
  }
}

function nanError(fn: string, offset: number, i: number): ArgumentError {
  return new ArgumentError(`${fn}: logits[${offset + i}] (token id ${i}) is NaN`);
}

/**
 * The id (relative to `offset`) of the largest logit of `logits[offset .. offset+vocab)`; the lowest
 * id on ties. NaN is an ArgumentError naming its position.
 * @param logits a Float32Array holding the row (e.g. one row of `[B, V]` logits).
 * @param offset index of the row's first element. Default 0.
 * @param vocab row length V. Default `logits.length - offset`.
 */
export function argmax(logits: Float32Array, offset = 0, vocab = logits.length - offset): number {
  checkRow('argmax', logits, offset, vocab);
  let best = 0;
  let bv = logits[offset];
  if (bv !== bv) throw nanError('argmax', offset, 0);
  for (let i = 1; i < vocab; i++) {
    const v = logits[offset + i];
    if (v > bv) {
      bv = v;
      best = i;
    } else if (v !== v) {
      throw nanError('argmax', offset, i);
    }
  }
  return best;
}

/**
 * log softmax of one row: `out[i] = l_i - max - log(sum_j exp(l_j - max))`, sums in float64.
 * -Inf logits give -Inf; with k > 0 logits at +Inf those get -log(k) and all others -Inf.
 * NaN is an ArgumentError naming its position; a row of only -Inf is an ArgumentError.
 * @param logits a Float32Array holding the row.
 * @param offset index of the row's first element. Default 0.
 * @param vocab row length V. Default `logits.length - offset`.
 * @param out optional output of length >= V (written at [0, V)); allocated when absent.
 * @returns `out` (a Float32Array [V]).
 */
export function logSoftmax(logits: Float32Array, offset = 0, vocab = logits.length - offset, out?: Float32Array): Float32Array {
  checkRow('logSoftmax', logits, offset, vocab);
  if (out === undefined) out = new Float32Array(vocab);
  else if (!(out instanceof Float32Array)) throw new DTypeError(`logSoftmax: out must be a Float32Array, got ${(out as object)?.constructor?.name ?? typeof out}`);
  else if (out.length < vocab) throw new ShapeError(`logSoftmax: out must have length >= vocab ${vocab}, got ${out.length}`);
  let max = -Infinity;
  for (let i = 0; i < vocab; i++) {
    const v = logits[offset + i];
    if (v !== v) throw nanError('logSoftmax', offset, i);
    if (v > max) max = v;
  }
  if (max === -Infinity) throw new ArgumentError(`logSoftmax: all ${vocab} logits are -Inf`);
  if (max === Infinity) {
    let k = 0;
    for (let i = 0; i < vocab; i++) if (logits[offset + i] === Infinity) k++;
    const lk = -Math.log(k);
    for (let i = 0; i < vocab; i++) out[i] = logits[offset + i] === Infinity ? lk : -Infinity;
    return out;
  }
  let sum = 0;
  for (let i = 0; i < vocab; i++) sum += Math.exp(logits[offset + i] - max);
  const lse = max + Math.log(sum);
  for (let i = 0; i < vocab; i++) out[i] = logits[offset + i] - lse;
  return out;
}

function checkOption(name: string, v: unknown, ok: (x: number) => boolean, want: string): void {
  if (v === undefined) return;
  if (typeof v !== 'number' || !ok(v)) throw new ArgumentError(`Sampler: option ${name} must be ${want}, got ${typeof v === 'number' ? v : JSON.stringify(v)}`);
}

/**
 * A seeded token sampler. One instance per generation stream (its generator advances with each
 * sampled token). Not thread-safe in the sense of sharing one instance between interleaved streams:
 * they would share one random sequence.
 */
export class Sampler {
  /** Resolved temperature (>= 0). */
  readonly temperature: number;
  /** Resolved top-k (0 = off). */
  readonly topK: number;
  /** Resolved top-p (1 = off). */
  readonly topP: number;
  /** Resolved min-p (0 = off). */
  readonly minP: number;
  /** Resolved repetition penalty (1 = off). */
  readonly repetitionPenalty: number;
  /** The seed in use (given, or drawn at construction when none was given). */
  readonly seed: number;

  private readonly rng: Rng;
  private w = new Float64Array(0); // [V] scratch: penalized logits, then weights
  private idx = new Int32Array(0); // [V] scratch: candidate ids
  private mark = new Uint8Array(0); // [V] scratch: ids of history already penalized

  /** @param opts see {@link SamplingOptions}; all fields optional. */
  constructor(opts: SamplingOptions = {}) {
    if (opts === null || typeof opts !== 'object') throw new ArgumentError(`Sampler: options must be an object, got ${opts === null ? 'null' : typeof opts}`);
    checkOption('temperature', opts.temperature, (x) => Number.isFinite(x) && x >= 0, 'a finite number >= 0');
    checkOption('topK', opts.topK, (x) => Number.isSafeInteger(x) && x >= 0, 'an integer >= 0 (0 = off)');
    checkOption('topP', opts.topP, (x) => x > 0 && x <= 1, 'in (0, 1] (1 = off)');
    checkOption('minP', opts.minP, (x) => x >= 0 && x <= 1, 'in [0, 1] (0 = off)');
    checkOption('repetitionPenalty', opts.repetitionPenalty, (x) => Number.isFinite(x) && x > 0, 'a finite number > 0 (1 = off)');
    checkOption('seed', opts.seed, (x) => Number.isSafeInteger(x), 'a safe integer');
    this.temperature = opts.temperature ?? 1;
    this.topK = opts.topK ?? 0;
    this.topP = opts.topP ?? 1;
    this.minP = opts.minP ?? 0;
    this.repetitionPenalty = opts.repetitionPenalty ?? 1;
    this.seed = opts.seed ?? Math.floor(Math.random() * 2 ** 32);
    this.rng = new Rng(this.seed);
  }

  private ensure(V: number): void {
    if (this.w.length >= V) return;
    const n = Math.max(V, Math.min(SCRATCH_HINT, this.w.length * 2));
    this.w = new Float64Array(n);
    this.idx = new Int32Array(n);
    this.mark = new Uint8Array(n);
  }

  /**
   * Draws one token id from a row of logits (see the file header for the order of the transforms).
   * The row is not modified.
   * @param logits Float32Array holding the row (e.g. the last position's row of `[B, T, V]` logits).
   * @param offset index of the row's first element. Default 0.
   * @param vocab row length V. Default `logits.length - offset`.
   * @param history ids seen so far (prompt and generated), for the repetition penalty; each must be
   *   in [0, V) (TokenRangeError otherwise). Ignored when the penalty is 1.
   * @returns a token id in [0, V).
   */
  sample(logits: Float32Array, offset = 0, vocab = logits.length - offset, history?: ArrayLike<number>): number {
    const n = this.filter('Sampler.sample', logits, offset, vocab, history);
    const w = this.w;
    const idx = this.idx;
    if (n < 0) {
      // Greedy: the candidate is decided. +Inf logits: uniform among them (marked by weight 1).
      if (this.temperature === 0) return -n - 1;
      let pick = Math.floor(this.rng.next() * -n);
      for (let i = 0; i < vocab; i++) if (w[i] === 1 && pick-- === 0) return i;
      throw new Error('Sampler.sample: internal error (no +Inf candidate)');
    }
    let total = 0;
    for (let j = 0; j < n; j++) total += w[idx[j]];
    const u = this.rng.next() * total;
    let acc = 0;
    for (let j = 0; j < n; j++) {
      acc += w[idx[j]];
      if (u < acc) return idx[j];
    }
    // Rounding: u fell on the upper edge; return the last kept candidate.
    return idx[n - 1];
  }

  /**
   * The distribution {@link sample} draws from for this row: probabilities after penalty,
   * temperature, top-k, top-p and min-p, renormalized (one-hot for greedy). Consumes no randomness.
   * For inspection (showing alternatives, tests); same arguments as {@link sample}.
   * @param out optional Float64Array of length >= V (written at [0, V)); allocated when absent.
   * @returns `out`, a Float64Array [V] summing to 1.
   */
  probabilities(logits: Float32Array, offset = 0, vocab = logits.length - offset, history?: ArrayLike<number>, out?: Float64Array): Float64Array {
    if (out !== undefined && !(out instanceof Float64Array)) throw new DTypeError(`Sampler.probabilities: out must be a Float64Array, got ${(out as object)?.constructor?.name ?? typeof out}`);
    if (out !== undefined && out.length < vocab) throw new ShapeError(`Sampler.probabilities: out must have length >= vocab ${vocab}, got ${out.length}`);
    const n = this.filter('Sampler.probabilities', logits, offset, vocab, history);
    const res = out ?? new Float64Array(vocab);
    res.fill(0, 0, vocab);
    const w = this.w;
    const idx = this.idx;
    if (n < 0) {
      if (this.temperature === 0) res[-n - 1] = 1;
      else for (let i = 0; i < vocab; i++) if (w[i] === 1) res[i] = 1 / -n;
      return res;
    }
    let total = 0;
    for (let j = 0; j < n; j++) total += w[idx[j]];
    for (let j = 0; j < n; j++) res[idx[j]] = w[idx[j]] / total;
    return res;
  }

  /**
   * Shared front of sample / probabilities. Returns n >= 1 when idx[0, n) holds the kept candidates
   * with weights w[id] > 0; or a negative code: -(id + 1) for greedy (the argmax id), or -k when k
   * logits are +Inf (then w[i] === 1 exactly for those and 0 elsewhere).
   */
  private filter(fn: string, logits: Float32Array, offset: number, V: number, history: ArrayLike<number> | undefined): number {
    checkRow(fn, logits, offset, V);
    this.ensure(V);
    const w = this.w;
    let max = -Infinity;
    for (let i = 0; i < V; i++) {
      const v = logits[offset + i];
      if (v !== v) throw nanError(fn, offset, i);
      w[i] = v;
      if (v > max) max = v;
    }
    const r = this.repetitionPenalty;
    if (r !== 1 && history !== undefined && history.length > 0) {
      const mark = this.mark;
      const n = history.length;
      let bad = -1;
      for (let j = 0; j < n; j++) {
        const id = history[j];
        if (!(Number.isInteger(id) && id >= 0 && id < V)) {
          bad = j;
          break;
        }
        if (mark[id] === 0) {
          mark[id] = 1;
          const v = w[id];
          w[id] = v > 0 ? v / r : v * r;
        }
      }
      for (let j = 0; j < n; j++) {
        const id = history[j];
        if (Number.isInteger(id) && id >= 0 && id < V) mark[id] = 0;
      }
      if (bad >= 0) throw new TokenRangeError(`${fn}: history[${bad}] = ${history[bad]} is not a token id in [0, ${V})`);
      max = -Infinity;
      for (let i = 0; i < V; i++) if (w[i] > max) max = w[i];
    }
    if (max === -Infinity) throw new ArgumentError(`${fn}: all ${V} logits are -Inf${r !== 1 ? ' (after the repetition penalty)' : ''}: nothing can be sampled`);
    if (this.temperature === 0) {
      for (let i = 0; i < V; i++) if (w[i] === max) return -(i + 1);
    }
    if (max === Infinity) {
      let k = 0;
      for (let i = 0; i < V; i++) {
        const inf = w[i] === Infinity;
        w[i] = inf ? 1 : 0;
        if (inf) k++;
      }
      return -k;
    }

    // Weights relative to the top token (whose weight is exactly 1): w = exp((l - max) / T).
    const invT = 1 / this.temperature;
    const idx = this.idx;
    let n = 0;
    if (this.topK > 0 && this.topK < V) {
      // Top-k on the logits themselves (exp is monotone, so the order is the same), then exp of
      // the k survivors only: exp is the costly part of a row (~15 ns each in V8).
      for (let i = 0; i < V; i++) if (w[i] !== -Infinity) idx[n++] = i;
      if (this.topK < n) {
        selectTopK(w, idx, n, this.topK);
        n = this.topK;
      }
      let m = 0;
      for (let j = 0; j < n; j++) {
        const id = idx[j];
        const e = Math.exp((w[id] - max) * invT);
        w[id] = e;
        if (e > 0) idx[m++] = id;
      }
      n = m;
    } else {
      for (let i = 0; i < V; i++) {
        const e = Math.exp((w[i] - max) * invT);
        w[i] = e;
        if (e > 0) idx[n++] = i;
      }
    }
    // n >= 1: the top token has weight 1.
    if (this.topP < 1) {
      let total = 0;
      for (let j = 0; j < n; j++) total += w[idx[j]];
      n = selectTopMass(w, idx, 0, n, this.topP * total);
    }
    if (this.minP > 0) {
      // The top token (weight 1) always survives top-k and top-p, so the kept maximum is 1.
      const thr = this.minP;
      let m = 0;
      for (let j = 0; j < n; j++) if (w[idx[j]] >= thr) idx[m++] = idx[j];
      n = m;
    }
    return n;
  }
}

/** Total order: a before b when w[a] > w[b], or equal weights and a < b. */
function better(w: Float64Array, a: number, b: number): boolean {
  const wa = w[a];
  const wb = w[b];
  return wa > wb || (wa === wb && a < b);
}

/**
 * Partitions idx[lo, hi) around a pivot (median of three): on return idx[lo, p) are better than the
 * pivot, idx[p] is the pivot, idx(p, hi) are worse. Returns p.
 */
function partition(w: Float64Array, idx: Int32Array, lo: number, hi: number): number {
  const mid = lo + ((hi - lo) >> 1);
  const last = hi - 1;
  // Median of idx[lo], idx[mid], idx[last] by the total order, moved to `last`.
  const a = idx[lo], b = idx[mid], c = idx[last];
  let m: number;
  if (better(w, a, b)) m = better(w, b, c) ? mid : better(w, a, c) ? last : lo;
  else m = better(w, a, c) ? lo : better(w, b, c) ? last : mid;
  let t = idx[m];
  idx[m] = idx[last];
  idx[last] = t;
  const pid = idx[last];
  const pw = w[pid];
  let p = lo;
  for (let j = lo; j < last; j++) {
    const x = idx[j];
    const wx = w[x];
    if (wx > pw || (wx === pw && x < pid)) {
      idx[j] = idx[p];
      idx[p] = x;
      p++;
    }
  }
  t = idx[p];
  idx[p] = idx[last];
  idx[last] = t;
  return p;
}

/**
 * Reorders idx[0, n) so that idx[0, k) are the k best candidates (in no particular order). 0 < k < n.
 * Small k: one pass keeping a min-heap of the k best in idx[0, k) (most candidates cost one
 * comparison with the heap's worst). Large k: quickselect.
 */
function selectTopK(w: Float64Array, idx: Int32Array, n: number, k: number): void {
  if (k <= HEAP_K_MAX && k * 16 <= n) {
    // idx[0, k) as a heap whose root is the worst kept candidate (a is "worse" than b: !better(a, b)).
    const siftDown = (i: number): void => {
      const x = idx[i];
      for (;;) {
        const l = 2 * i + 1;
        if (l >= k) break;
        let c = l;
        if (l + 1 < k && better(w, idx[l], idx[l + 1])) c = l + 1; // the worse child
        if (!better(w, x, idx[c])) break;
        idx[i] = idx[c];
        i = c;
      }
      idx[i] = x;
    };
    for (let i = (k >> 1) - 1; i >= 0; i--) siftDown(i);
    let rootId = idx[0];
    let rootW = w[rootId];
    for (let j = k; j < n; j++) {
      const x = idx[j];
      const wx = w[x];
      if (wx > rootW || (wx === rootW && x < rootId)) {
        idx[j] = rootId;
        idx[0] = x;
        siftDown(0);
        rootId = idx[0];
        rootW = w[rootId];
      }
    }
    return;
  }
  let lo = 0;
  let hi = n;
  while (hi - lo > 1) {
    const p = partition(w, idx, lo, hi);
    if (p === k || p + 1 === k) return;
    if (p > k) hi = p;
    else lo = p + 1;
  }
}

/**
 * Reorders idx[lo, n) so that its first m entries are the m best candidates, m the smallest count
 * whose weight sum reaches `need`; returns lo + m (m >= 1). Quickselect on the mass of the better side.
 */
function selectTopMass(w: Float64Array, idx: Int32Array, lo: number, n: number, need: number): number {
  const start = lo;
  let hi = n;
  while (lo < hi) {
    const p = partition(w, idx, lo, hi);
    let upper = 0;
    for (let j = lo; j < p; j++) upper += w[idx[j]];
    if (upper >= need && p > lo) {
      hi = p; // the boundary lies inside the better part
    } else {
      const withPivot = upper + w[idx[p]];
      if (withPivot >= need) return p + 1;
      need -= withPivot;
      lo = p + 1;
    }
  }
  return Math.max(start + 1, lo);
}
