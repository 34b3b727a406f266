/**
 * Batch loaders for next-token training over a {@link TokenCorpus}: a packed, shuffled loader per
 * corpus, a weighted mixture of those (the datamix of stitch training), and an in-order evaluation
 * iterator. Shapes: B rows of T tokens, returned flat as `[B*T]` Int32Arrays (row-major).
 *
 * Packing: the token stream (documents back to back, separated by EOS when the corpus has it) is cut
 * into W = floor((N - 1) / T) windows; window w is tokens[w*T, w*T + T + 1), inputs its first T and
 * targets its last T tokens. Consecutive windows share one boundary token (the last target of one is
 * the first input of the next), so the input spans never overlap and neither do the target spans:
 * each token after the first is a target exactly once per epoch. Windows cross document
 * boundaries (the model sees EOS and then the next document); the tail of fewer than T + 1 tokens
 * is not used for training (evalBatches covers it).
 *
 * Order and resumability: epoch e visits the windows in a permutation drawn from
 * PCG32(seed, stream e) (../util/random.ts), so the position is fully described by {seed, epoch,
 * index, T}: {@link LoaderState}, plain JSON for checkpoints. Restoring recomputes the epoch's
 * permutation and continues with exactly the batches an uninterrupted loader would have produced.
 * The state also records W and the shuffle flag, so restoring against a different corpus or setup
 * is an error instead of silently different data.
 *
 * Mixture: each row of a batch comes from a domain drawn independently with the given weights by the
 * mixture's own PCG32. Chosen over exact per-batch proportions (largest remainder), which are biased
 * whenever B * weight is not an integer (with weights .15/.15/.15/.55 and B = 4 the same two small
 * domains would win the remainders every time); independent draws are unbiased and converge to the
 * weights, and the domain of every row is reported so per-domain losses can be logged.
 *
 * Known limits: the whole corpus is in memory; the permutation of an epoch costs 4 bytes per window
 * (a 1B-token corpus at T = 1024: ~4 MB).
 */
import { ArgumentError, ShapeError } from '../errors.js';
import { Rng, type RngState } from '../util/random.js';
import { validateCorpus, type TokenCorpus } from './tokens.js';

/** Flat next-token batch: B rows of T. */
export interface TokenBatch {
  /** [B*T] input ids. */
  inputs: Int32Array;
  /** [B*T] target ids (inputs shifted by one position). */
  targets: Int32Array;
}

/** JSON-serializable position of a {@link PackedLoader}. */
export interface LoaderState {
  /** Seed of the window order. */
  seed: number;
  /** Current epoch (0-based). */
  epoch: number;
  /** Index, within the epoch's order, of the next window to hand out. */
  index: number;
  /** Window length (tokens per row). */
  T: number;
  /** Number of windows of the corpus (checked on restore). */
  windows?: number;
  /** Whether windows are shuffled (default true). */
  shuffle?: boolean;
}

/** Options of {@link PackedLoader}. */
export interface PackedLoaderOptions {
  /** Sequence length T (tokens per row), integer >= 1. */
  T: number;
  /** Seed of the window order (any safe integer). Default 0. */
  seed?: number;
  /** Shuffle the windows each epoch. Default true; false visits them in stream order every epoch. */
  shuffle?: boolean;
}

function posInt(what: string, v: unknown): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1) throw new ArgumentError(`${what} must be a positive integer, got ${JSON.stringify(v)}`);
  return v;
}

/** Number of training windows of T + 1 tokens (stride T) in a stream of `tokens` tokens. */
export function windowCount(tokens: number, T: number): number {
  return tokens > T ? Math.floor((tokens - 1) / T) : 0;
}

/** Packed, shuffled next-token batches from one corpus (see the file comment). */
export class PackedLoader {
  /** Tokens per row. */
  readonly T: number;
  /** Seed of the window order. */
  readonly seed: number;
  /** Whether each epoch is shuffled. */
  readonly shuffle: boolean;
  /** Windows per epoch, W. */
  readonly numWindows: number;
  private readonly tokens: Int32Array;
  private ep = 0;
  private idx = 0;
  private perm: Int32Array | null = null; // null when not shuffled

  /**
   * @param corpus the token stream (validated: ids in range, document starts well formed).
   * @param options see {@link PackedLoaderOptions}. T + 1 tokens must be available (ArgumentError otherwise).
   */
  constructor(corpus: TokenCorpus, options: PackedLoaderOptions) {
    validateCorpus(corpus, 'PackedLoader: corpus');
    if (options === null || typeof options !== 'object') throw new ArgumentError('PackedLoader: options { T, seed?, shuffle? } are required');
    this.T = posInt('PackedLoader: T', options.T);
    const seed = options.seed ?? 0;
    if (!Number.isSafeInteger(seed)) throw new ArgumentError(`PackedLoader: seed must be a safe integer, got ${seed}`);
    this.seed = seed;
    this.shuffle = options.shuffle ?? true;
    if (typeof this.shuffle !== 'boolean') throw new ArgumentError(`PackedLoader: shuffle must be a boolean, got ${JSON.stringify(options.shuffle)}`);
    this.tokens = corpus.tokens;
    this.numWindows = windowCount(corpus.tokens.length, this.T);
    if (this.numWindows === 0) {
      throw new ArgumentError(`PackedLoader: T + 1 = ${this.T + 1} tokens are needed for one window, the corpus has ${corpus.tokens.length}`);
    }
    this.startEpoch(0);
  }

  /** Current epoch (0-based). */
  get epoch(): number {
    return this.ep;
  }

  /** Index of the next window within the current epoch's order. */
  get index(): number {
    return this.idx;
  }

  private startEpoch(e: number): void {
    this.ep = e;
    this.idx = 0;
    if (!this.shuffle) {
      this.perm = null;
      return;
    }
    const W = this.numWindows;
    const perm = this.perm !== null && this.perm.length === W ? this.perm : new Int32Array(W);
    for (let i = 0; i < W; i++) perm[i] = i;
    new Rng(this.seed, e).shuffle(perm);
    this.perm = perm;
  }

  /** Copies the next window into row `row` of inputs / targets ([rows*T] each) and advances. @internal */
  nextInto(inputs: Int32Array, targets: Int32Array, row: number): void {
    if (this.idx >= this.numWindows) this.startEpoch(this.ep + 1);
    const w = this.perm === null ? this.idx : this.perm[this.idx];
    this.idx++;
    const T = this.T;
    const s = w * T;
    inputs.set(this.tokens.subarray(s, s + T), row * T);
    targets.set(this.tokens.subarray(s + 1, s + T + 1), row * T);
  }

  /**
   * The next B rows. Rolls over into the next epoch (a new order) mid-batch when needed.
   * @param B rows, integer >= 1.
   * @param out optional destination arrays ([B*T] each) to fill instead of allocating.
   */
  next(B: number, out?: TokenBatch): TokenBatch {
    posInt('PackedLoader.next: B', B);
    const n = B * this.T;
    const res = out ?? { inputs: new Int32Array(n), targets: new Int32Array(n) };
    if (!(res.inputs instanceof Int32Array) || !(res.targets instanceof Int32Array) || res.inputs.length !== n || res.targets.length !== n) {
      throw new ShapeError(`PackedLoader.next: out.inputs and out.targets must be Int32Arrays of B*T = ${n}, got ${res.inputs?.length} and ${res.targets?.length}`);
    }
    for (let b = 0; b < B; b++) this.nextInto(res.inputs, res.targets, b);
    return res;
  }

  /** The position (a fresh plain object: store it as JSON). */
  state(): LoaderState {
    return { seed: this.seed, epoch: this.ep, index: this.idx, T: this.T, windows: this.numWindows, shuffle: this.shuffle };
  }

  /**
   * A loader over `corpus` that continues exactly where the one that produced `state` was. The
   * corpus must be the same (its window count is checked when the state records it).
   */
  static restore(corpus: TokenCorpus, state: LoaderState): PackedLoader {
    if (state === null || typeof state !== 'object') throw new ArgumentError(`PackedLoader.restore: state must be a LoaderState object, got ${JSON.stringify(state)}`);
    const l = new PackedLoader(corpus, { T: state.T, seed: state.seed, shuffle: state.shuffle ?? true });
    if (state.windows !== undefined && state.windows !== l.numWindows) {
      throw new ArgumentError(`PackedLoader.restore: the state is for a corpus of ${state.windows} windows of T = ${state.T}, this corpus has ${l.numWindows} (a different corpus?)`);
    }
    if (!Number.isSafeInteger(state.epoch) || state.epoch < 0) throw new ArgumentError(`PackedLoader.restore: state.epoch must be an integer >= 0, got ${state.epoch}`);
    if (!Number.isSafeInteger(state.index) || state.index < 0 || state.index > l.numWindows) {
      throw new ArgumentError(`PackedLoader.restore: state.index must be an integer in [0, ${l.numWindows}], got ${state.index}`);
    }
    if (state.epoch !== 0) l.startEpoch(state.epoch);
    l.idx = state.index;
    return l;
  }
}

/** One batch of {@link evalBatches}. */
export interface EvalBatch extends TokenBatch {
  /** Rows in this batch (B, or fewer for the last one); inputs/targets are [rows*T]. */
  rows: number;
  /** Index of the first window of the batch. */
  firstWindow: number;
  /** Targets that are not ignoreIndex (for a mean loss over the whole pass). */
  count: number;
}

/** Options of {@link evalBatches}. */
export interface EvalBatchesOptions {
  /** Tokens per row, integer >= 1. */
  T: number;
  /** Rows per batch, integer >= 1. */
  B: number;
  /** Include the final partial window, its missing targets set to ignoreIndex. Default true. */
  partial?: boolean;
  /** Target value of padding positions (the cross-entropy op ignores it). Default -100. */
  ignoreIndex?: number;
}

/**
 * Every window of a corpus once, in stream order, in batches of up to B rows: for held-out loss and
 * perplexity. With `partial` (the default) the last, shorter window is included and padded (inputs
 * 0, targets ignoreIndex), so every token after the first is a target exactly once. Each batch has
 * its own arrays (safe to keep while the next one is produced).
 */
export function* evalBatches(corpus: TokenCorpus, options: EvalBatchesOptions): Generator<EvalBatch> {
  validateCorpus(corpus, 'evalBatches: corpus');
  const T = posInt('evalBatches: T', options?.T);
  const B = posInt('evalBatches: B', options.B);
  const ignore = options.ignoreIndex ?? -100;
  if (!Number.isSafeInteger(ignore)) throw new ArgumentError(`evalBatches: ignoreIndex must be an integer, got ${ignore}`);
  const tokens = corpus.tokens;
  const N = tokens.length;
  if (N < 2) throw new ArgumentError(`evalBatches: at least 2 tokens are needed, the corpus has ${N}`);
  const W = (options.partial ?? true) ? Math.ceil((N - 1) / T) : windowCount(N, T);
  if (W === 0) throw new ArgumentError(`evalBatches: T + 1 = ${T + 1} tokens are needed for one full window, the corpus has ${N} (pass partial: true)`);
  for (let w0 = 0; w0 < W; w0 += B) {
    const rows = Math.min(B, W - w0);
    const inputs = new Int32Array(rows * T);
    const targets = new Int32Array(rows * T).fill(ignore);
    let count = 0;
    for (let r = 0; r < rows; r++) {
      const s = (w0 + r) * T;
      const m = Math.min(T, N - 1 - s); // targets available in this window
      inputs.set(tokens.subarray(s, s + m), r * T);
      targets.set(tokens.subarray(s + 1, s + 1 + m), r * T);
      count += m;
    }
    yield { inputs, targets, rows, firstWindow: w0, count };
  }
}

/** A {@link MixtureLoader} batch: a {@link TokenBatch} plus the domain of each row. */
export interface MixtureBatch extends TokenBatch {
  /** [B] domain name of each row. */
  domains: string[];
}

/** JSON-serializable position of a {@link MixtureLoader}. */
export interface MixtureState {
  kind: 'mixture';
  /** Seed the mixture's generator was created with. */
  seed: number;
  /** Domain names, in the order their weights are used. */
  names: string[];
  /** Normalized weights, same order as names. */
  weights: number[];
  /** The mixture generator's state (domain draws). */
  rng: RngState;
  /** Each member's position. */
  members: Record<string, LoaderState>;
}

/** Options of {@link MixtureLoader}. */
export interface MixtureOptions {
  /** Seed of the domain draws (any safe integer). Default 0. */
  seed?: number;
}

/**
 * Batches whose rows come from several named corpora in given proportions (e.g. { code: .15, math:
 * .15, multilingual: .15, general: .55 }); see the file comment for why each row's domain is an
 * independent seeded draw.
 */
export class MixtureLoader {
  /** Tokens per row (shared by all members). */
  readonly T: number;
  /** Domain names in weight order. */
  readonly names: readonly string[];
  /** Normalized weights (sum 1), in the order of {@link names}. */
  readonly weights: readonly number[];
  /** Seed of the domain draws. */
  readonly seed: number;
  private readonly members: PackedLoader[];
  private readonly cum: Float64Array;
  private rng: Rng;

  /**
   * @param loaders one PackedLoader per domain, all with the same T.
   * @param weights a non-negative weight per domain (same names; normalized here; at least one > 0).
   * @param options see {@link MixtureOptions}.
   */
  constructor(loaders: Record<string, PackedLoader>, weights: Record<string, number>, options: MixtureOptions = {}) {
    if (loaders === null || typeof loaders !== 'object') throw new ArgumentError('MixtureLoader: loaders must be an object of name -> PackedLoader');
    if (weights === null || typeof weights !== 'object') throw new ArgumentError('MixtureLoader: weights must be an object of name -> number');
    const names = Object.keys(loaders);
    if (names.length === 0) throw new ArgumentError('MixtureLoader: at least one loader is needed');
    const wNames = Object.keys(weights);
    for (const n of wNames) if (!(n in loaders)) throw new ArgumentError(`MixtureLoader: weight for "${n}" has no loader (loaders: ${names.join(', ')})`);
    let sum = 0;
    for (const n of names) {
      if (!(loaders[n] instanceof PackedLoader)) throw new ArgumentError(`MixtureLoader: loaders["${n}"] must be a PackedLoader`);
      const w = weights[n];
      if (typeof w !== 'number' || !Number.isFinite(w) || w < 0) throw new ArgumentError(`MixtureLoader: weights["${n}"] must be a finite number >= 0, got ${JSON.stringify(w)}`);
      sum += w;
      if (loaders[n].T !== loaders[names[0]].T) throw new ArgumentError(`MixtureLoader: loaders["${n}"].T = ${loaders[n].T} differs from loaders["${names[0]}"].T = ${loaders[names[0]].T}`);
    }
    if (!(sum > 0)) throw new ArgumentError('MixtureLoader: the weights sum to 0; at least one must be > 0');
    const seed = options.seed ?? 0;
    if (!Number.isSafeInteger(seed)) throw new ArgumentError(`MixtureLoader: seed must be a safe integer, got ${seed}`);
    this.seed = seed;
    this.T = loaders[names[0]].T;
    this.names = names;
    this.members = names.map((n) => loaders[n]);
    this.weights = [];
    this.cum = new Float64Array(names.length);
    this.setWeights(names.map((n) => weights[n] / sum));
    this.rng = new Rng(seed);
  }

  /** Sets the normalized weights and their cumulative sums (restore passes the saved ones verbatim). */
  private setWeights(w: number[]): void {
    (this as { weights: readonly number[] }).weights = w;
    let acc = 0;
    w.forEach((x, i) => (this.cum[i] = acc += x));
  }

  /** The member loader of a domain. */
  member(name: string): PackedLoader {
    const i = this.names.indexOf(name);
    if (i < 0) throw new ArgumentError(`MixtureLoader.member: no domain "${name}" (domains: ${this.names.join(', ')})`);
    return this.members[i];
  }

  private draw(): number {
    const u = this.rng.next();
    const cum = this.cum;
    const last = cum.length - 1;
    for (let i = 0; i < last; i++) if (u < cum[i] && this.weights[i] > 0) return i;
    // The last domain takes the rest (also covers rounding of the cumulative sum below 1),
    // unless its weight is 0: then the last domain with a positive weight.
    for (let i = last; i >= 0; i--) if (this.weights[i] > 0) return i;
    return last;
  }

  /**
   * The next B rows, each from a domain drawn with the weights.
   * @param B rows, integer >= 1.
   */
  next(B: number): MixtureBatch {
    posInt('MixtureLoader.next: B', B);
    const n = B * this.T;
    const inputs = new Int32Array(n);
    const targets = new Int32Array(n);
    const domains: string[] = [];
    for (let b = 0; b < B; b++) {
      const d = this.draw();
      this.members[d].nextInto(inputs, targets, b);
      domains.push(this.names[d]);
    }
    return { inputs, targets, domains };
  }

  /** The position of the mixture and of every member (a fresh plain object). */
  state(): MixtureState {
    const members: Record<string, LoaderState> = {};
    this.names.forEach((n, i) => (members[n] = this.members[i].state()));
    return { kind: 'mixture', seed: this.seed, names: [...this.names], weights: [...this.weights], rng: this.rng.state(), members };
  }

  /**
   * A mixture continuing exactly where the one that produced `state` was.
   * @param corpora the corpus of every domain named in the state (the same ones as before).
   */
  static restore(corpora: Record<string, TokenCorpus>, state: MixtureState): MixtureLoader {
    if (state === null || typeof state !== 'object' || state.kind !== 'mixture') throw new ArgumentError(`MixtureLoader.restore: not a mixture state (kind ${JSON.stringify((state as { kind?: unknown } | null)?.kind)})`);
    if (!Array.isArray(state.names) || !Array.isArray(state.weights) || state.names.length !== state.weights.length) {
      throw new ArgumentError('MixtureLoader.restore: state.names and state.weights must be arrays of the same length');
    }
    const loaders: Record<string, PackedLoader> = {};
    const weights: Record<string, number> = {};
    state.names.forEach((n, i) => {
      if (!corpora || !(n in corpora)) throw new ArgumentError(`MixtureLoader.restore: no corpus given for domain "${n}"`);
      if (!state.members || !(n in state.members)) throw new ArgumentError(`MixtureLoader.restore: the state has no position for domain "${n}"`);
      loaders[n] = PackedLoader.restore(corpora[n], state.members[n]);
      weights[n] = state.weights[i];
    });
    const m = new MixtureLoader(loaders, weights, { seed: state.seed });
    // The saved normalized weights verbatim: renormalizing could move a cumulative sum by one ulp
    // and change a draw, breaking bit-exact resumption.
    m.setWeights([...state.weights]);
    m.rng = Rng.restore(state.rng);
    return m;
  }
}
