/**
 * StitchedModel: a frozen hub and n frozen experts (Llama models of one architecture and tokenizer)
 * joined by K trained stitch layers (../shared/METHOD.md, docs/FORMAT.md). Only the stitch parameters
 * train; the loss is next-token on the hub's output.
 *
 * The stitch parameters live in one flat Float32Array in the order of stitchTensorNames() (per stitch:
 * the n projections, then the gate), with a gradient buffer of the same layout, so the generic
 * Trainer (lib/train/trainer.ts) runs AdamW over them exactly as over a Llama model's weights.
 * Every element is a matrix, so nDecay covers all of them; the stitch trainer's default weight decay
 * is 0 (the paper is silent), which also keeps slices with zero gradient (see addExpert) unchanged.
 *
 * Initialisation ('identity-zero', the package default): every W_proj = I, every W_gate = 0, so an
 * E->H stitch starts as the uniform mix of hub and experts and an H->E stitch at g = 0.5; with
 * `hubBias` b > 0 the fixed bias makes the start hub-preserving (E->H gives the hub weight
 * e^b / (e^b + n), H->E g = sigmoid(-b)). 'random' draws N(0, 0.02) (tests).
 *
 * On disk: `stitch.json` (manifest: hub and expert paths relative to it, their weight hashes, the
 * placement and options) and `stitches.safetensors`. Loading recomputes each model's hash and refuses
 * a manifest whose models changed.
 *
 * Modularity: removeExpert(e) drops expert e's projections and gate rows (the model still runs);
 * addExpert(model) adds slices initialised by the init rule, optionally training only those.
 *
 * Device (`device: 'cpu' | 'cuda' | 'auto'`, default the process default of lib/device.ts, as
 * LlamaModel): 'cpu' runs the native stitched engine over the arrays in place; 'cuda' the
 * device-resident CUDA stitched model (lib/engine/cuda-stitched.ts). On CUDA the host arrays stay the
 * master copy: the hub, experts and stitches are copied to the device when the engine is created, the
 * stitches again before the next call after {@link StitchedModel.syncPrecisionCopies} (the trainer
 * calls it after every optimizer step of a host optimizer); the device gradient sum is copied into
 * {@link grads} after every forwardBackward and zeroed by {@link StitchedModel.zeroGrad}.
 * {@link StitchedModel.optimizerStep} (what the Trainer calls) runs AdamW on the device there (moments
 * on the GPU, copied back by {@link StitchedModel.syncMoments}; the updated stitches are downloaded
 * into {@link params}), and on the CPU the same ops.adamwStep as the Trainer's fallback. KV-cached generation runs on
 * either engine (on CUDA the caches live in device memory, one per model); a cache belongs to the
 * engine that made it (setDevice invalidates it).
 */
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { checkDevice, resolveDevice, type Device } from '../device.js';
import { cudaStitchedCreate, type CudaStitched } from '../engine/cuda-stitched.js';
import { DeviceMoments } from '../engine/device-moments.js';
import { ArgumentError, DisposedError, FormatError, ShapeError, UnsupportedFeatureError } from '../errors.js';
import { writeFileAtomic } from '../formats/atomic.js';
import { openSafetensors, writeSafetensorsAsync, type TensorToWrite } from '../formats/safetensors.js';
import { stitchedCreate, type NativeStitched } from '../engine/stitched-native.js';
import type { NativeKvCache } from '../engine/native.js';
import { LlamaModel, checkTokens, type OptimizerStepOptions } from '../model/llama.js';
import { adamwStepAsync } from '../ops/adamw.js';
import { checkSameArchitecture } from '../baselines/soup.js';
import type { CausalDecoder, DecoderCache } from '../infer/generate.js';
import { Rng } from '../util/random.js';
import { checkStitchPlacement, gateRow, stitchPlacement, stitchTensorNames, type StitchPattern, type StitchSpec, type StitchTensorSpec } from './layout.js';

/** Options of {@link StitchedModel.create}. */
export interface StitchOptions {
  /** Number of stitches K (1..L). Default min(4, L). Ignored when `placement` is given. */
  K?: number;
  /** 'alternating' (ending with E->H) or 'all-eh'. Default 'alternating'. */
  pattern?: StitchPattern;
  /** Explicit placement (overrides K and pattern). */
  placement?: StitchSpec[];
  /** Expert stream after an E->H stitch: 'projected' (h_e' = p_e, the paper's literal reading) or 'unchanged'. Default 'projected'. */
  expertStream?: 'projected' | 'unchanged';
  /** Fixed (untrained) hub bias of the gates; > 0 is the hub-preserving start. Default 0. */
  hubBias?: number;
  /** Dropout probability on the gate logits in training. Default 0. */
  gateDropout?: number;
  /** 'identity-zero' (default) or 'random' (N(0, 0.02), for tests). */
  init?: 'identity-zero' | 'random';
  /** Seed of the 'random' init and of gate dropout. Default 0. */
  seed?: number;
  /** Names of the experts (default expert-0, expert-1, ...). */
  expertNames?: string[];
  /** Where the stitched engine runs: 'cpu', 'cuda' or 'auto'. Default: the process default (lib/device.ts). */
  device?: Device;
}

/** The manifest `stitch.json` (docs/FORMAT.md). */
export interface StitchManifest {
  format: 'bts-stitch';
  version: 1;
  hub: { path: string; sha256: string };
  experts: { name: string; path: string; sha256: string }[];
  stitches: StitchSpec[];
  expertStream: 'projected' | 'unchanged';
  hubBias: number;
  gateDropout: number;
  /** Seed of the gate-dropout masks (training only; optional on disk, default 0). */
  seed?: number;
  init: string;
  dModel: number;
  numExperts: number;
}

/** SHA-256 of a checkpoint's weights: its safetensors files' bytes in sorted file-name order (docs/FORMAT.md). */
export function modelWeightsSha256(dir: string): string {
  const index = path.join(dir, 'model.safetensors.index.json');
  let files: string[];
  if (fs.existsSync(index)) {
    const j = JSON.parse(fs.readFileSync(index, 'utf8')) as { weight_map?: Record<string, string> };
    if (!j.weight_map || typeof j.weight_map !== 'object') throw new FormatError(`${index}: no weight_map`);
    files = [...new Set(Object.values(j.weight_map))].sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
  } else {
    files = ['model.safetensors'];
  }
  const h = crypto.createHash('sha256');
  for (const f of files) {
    const p = path.join(dir, f);
    if (!fs.existsSync(p)) throw new FormatError(`${dir}: weight file ${f} is missing`);
    const fd = fs.openSync(p, 'r');
    try {
      const buf = Buffer.allocUnsafe(1 << 22);
      for (;;) {
        const n = fs.readSync(fd, buf, 0, buf.length, null);
        if (n === 0) break;
        h.update(buf.subarray(0, n));
      }
    } finally {
      fs.closeSync(fd);
    }
  }
  return h.digest('hex');
}

interface StitchCache extends DecoderCache {
  native: NativeKvCache;
}

/** Hub + experts + trained stitches (see the file comment). */
export class StitchedModel implements CausalDecoder {
  readonly hub: LlamaModel;
  readonly experts: LlamaModel[];
  readonly expertNames: string[];
  readonly placement: StitchSpec[];
  readonly expertStream: 'projected' | 'unchanged';
  readonly hubBias: number;
  readonly gateDropout: number;
  readonly init: string;
  readonly seed: number;
  /** Tensor specs in flat-buffer order. */
  readonly tensors: (StitchTensorSpec & { offset: number; length: number })[];
  /** Flat stitch parameters. */
  readonly params: Float32Array;
  /** Their gradients. */
  readonly grads: Float32Array;
  /** When set, gradients outside these [offset, length) ranges are zeroed after each backward. */
  trainableRanges: [number, number][] | null = null;
  private handle: NativeStitched | null = null;
  private disposed = false;
  /** The device asked for (undefined: the process default), resolved on first use. */
  private deviceChoice: Device | undefined = undefined;
  private resolvedDevice: 'cpu' | 'cuda' | null = null;
  /** CUDA engine: the host stitches changed since the last upload / the device gradients must be zeroed. */
  private cudaWeightsStale = false;
  private cudaGradsStale = false;
  /**
   * CUDA engine: the moment arrays whose state the device optimizer holds (null: none), and whether
   * the device state is newer than those host arrays (steps since the last {@link syncMoments}).
   */
  private readonly deviceMoments = new DeviceMoments();
  /** True when this object loaded its hub and experts itself (StitchedModel.load): dispose() frees them. */
  private ownsMembers = false;

  private constructor(hub: LlamaModel, experts: LlamaModel[], names: string[], placement: StitchSpec[], o: Required<Pick<StitchOptions, 'expertStream' | 'hubBias' | 'gateDropout' | 'seed'>> & { init: string }, params: Float32Array | null) {
    if (experts.length < 1) throw new ArgumentError('StitchedModel: give at least one expert');
    experts.forEach((e, i) => checkSameArchitecture(hub.config, e.config, 'the hub', `expert ${i} (${names[i]})`));
    if (hub.tokenizer && experts.some((e) => e.tokenizer && JSON.stringify(e.tokenizer.toTokenizerJson()) !== JSON.stringify(hub.tokenizer!.toTokenizerJson()))) {
      const i = experts.findIndex((e) => e.tokenizer && JSON.stringify(e.tokenizer.toTokenizerJson()) !== JSON.stringify(hub.tokenizer!.toTokenizerJson()));
      throw new ShapeError(`StitchedModel: expert ${i} (${names[i]}) has a different tokenizer from the hub`);
    }
    checkStitchPlacement(placement, hub.config.numHiddenLayers);
    if (o.expertStream !== 'projected' && o.expertStream !== 'unchanged') throw new ArgumentError(`StitchedModel: expertStream must be 'projected' or 'unchanged', got '${String(o.expertStream)}'`);
    if (!Number.isFinite(o.hubBias)) throw new ArgumentError(`StitchedModel: hubBias must be finite, got ${o.hubBias}`);
    if (!(o.gateDropout >= 0 && o.gateDropout < 1)) throw new ArgumentError(`StitchedModel: gateDropout must be in [0, 1), got ${o.gateDropout}`);
    if (!Number.isSafeInteger(o.seed) || o.seed < 0 || o.seed > 2 ** 32) throw new ArgumentError(`StitchedModel: seed must be an integer in [0, 2^32], got ${o.seed}`);
    this.hub = hub;
    this.experts = experts;
    this.expertNames = names;
    this.placement = placement.map((p) => ({ ...p }));
    this.expertStream = o.expertStream;
    this.hubBias = o.hubBias;
    this.gateDropout = o.gateDropout;
    this.init = o.init;
    this.seed = o.seed;
    let off = 0;
    this.tensors = stitchTensorNames(hub.config.hiddenSize, experts.length, placement).map((t) => {
      const length = t.shape[0] * t.shape[1];
      const r = { ...t, offset: off, length };
      off += length;
      return r;
    });
    if (params && params.length !== off) throw new ShapeError(`StitchedModel: ${params.length} stitch parameters given, the layout needs ${off}`);
    this.params = params ?? new Float32Array(off);
    this.grads = new Float32Array(off);
  }

  /** A new stitched model with freshly initialised stitches (see the file comment). */
  static create(hub: LlamaModel, experts: LlamaModel[], options: StitchOptions = {}): StitchedModel {
    const L = hub.config.numHiddenLayers;
    const placement = options.placement ?? stitchPlacement(L, options.K ?? Math.min(4, L), options.pattern ?? 'alternating');
    const names = options.expertNames ?? experts.map((_, i) => `expert-${i}`);
    if (names.length !== experts.length) throw new ArgumentError(`StitchedModel: ${names.length} expert names for ${experts.length} experts`);
    const init = options.init ?? 'identity-zero';
    if (init !== 'identity-zero' && init !== 'random') throw new ArgumentError(`StitchedModel: init must be 'identity-zero' or 'random', got '${String(init)}'`);
    const m = new StitchedModel(hub, experts, names, placement, { expertStream: options.expertStream ?? 'projected', hubBias: options.hubBias ?? 0, gateDropout: options.gateDropout ?? 0, seed: options.seed ?? 0, init }, null);
    m.initSlices(m.tensors, init, options.seed ?? 0);
    if (options.device !== undefined) m.setDevice(options.device);
    return m;
  }

  /**
   * Loads `dir/stitch.json` + `dir/stitches.safetensors` and the hub and experts it names (frozen,
   * bf16 or f32 as stored, memory-mapped). Refuses a manifest whose models' weights changed.
   */
  static async load(dir: string, options: { dtype?: 'f32' | 'bf16'; verifyHashes?: boolean; device?: Device } = {}): Promise<StitchedModel> {
    const man = readManifest(dir);
    const resolve = (p: string): string => path.resolve(dir, p);
    if (options.verifyHashes !== false) {
      for (const [what, entry] of [['hub', man.hub], ...man.experts.map((e) => [`expert '${e.name}'`, e] as const)] as const) {
        const got = modelWeightsSha256(resolve(entry.path));
        if (got !== entry.sha256) throw new FormatError(`${dir}/stitch.json: the ${what} at ${entry.path} changed since the stitches were trained (sha256 ${got.slice(0, 12)}..., manifest ${entry.sha256.slice(0, 12)}...)`);
      }
    }
    const hub = await LlamaModel.load(resolve(man.hub.path), { trainable: false, dtype: options.dtype });
    const experts: LlamaModel[] = [];
    for (const e of man.experts) experts.push(await LlamaModel.load(resolve(e.path), { trainable: false, dtype: options.dtype }));
    if (hub.config.hiddenSize !== man.dModel || experts.length !== man.numExperts) throw new FormatError(`${dir}/stitch.json: dModel ${man.dModel} / numExperts ${man.numExperts} do not match the models (D=${hub.config.hiddenSize}, n=${experts.length})`);
    const m = new StitchedModel(hub, experts, man.experts.map((e) => e.name), man.stitches, { expertStream: man.expertStream, hubBias: man.hubBias, gateDropout: man.gateDropout, seed: man.seed ?? 0, init: man.init }, null);
    m.ownsMembers = true;
    using st = openSafetensors(path.join(dir, 'stitches.safetensors'));
    for (const t of m.tensors) {
      const info = st.tensors.get(t.name);
      if (!info) throw new FormatError(`${dir}/stitches.safetensors: missing tensor '${t.name}' [${t.shape}]`);
      if (info.shape.join(',') !== t.shape.join(',')) throw new FormatError(`${dir}/stitches.safetensors: '${t.name}' has shape [${info.shape}], expected [${t.shape}]`);
      m.params.set(st.getF32(t.name), t.offset);
    }
    for (const name of st.tensors.keys()) if (!m.tensors.some((t) => t.name === name)) throw new FormatError(`${dir}/stitches.safetensors: unexpected tensor '${name}'`);
    if (options.device !== undefined) m.setDevice(options.device);
    return m;
  }

  /**
   * Writes `dir/stitches.safetensors` and `dir/stitch.json`. The hub and experts must have been
   * loaded from (or saved to) a directory: the manifest references them by path (relative to dir)
   * and hash.
   */
  async save(dir: string): Promise<void> {
    this.checkAlive();
    fs.mkdirSync(dir, { recursive: true });
    const ref = (m: LlamaModel, what: string): { path: string; sha256: string } => {
      if (!m.sourceDir) throw new ArgumentError(`StitchedModel.save: the ${what} has no directory; save it first (model.save(dir))`);
      return { path: path.relative(path.resolve(dir), m.sourceDir) || '.', sha256: modelWeightsSha256(m.sourceDir) };
    };
    const tensors: Record<string, TensorToWrite> = {};
    for (const t of this.tensors) tensors[t.name] = { dtype: 'F32', shape: t.shape, data: this.params.subarray(t.offset, t.offset + t.length) };
    await writeSafetensorsAsync(path.join(dir, 'stitches.safetensors'), tensors, { format: 'bts-stitch' });
    const man: StitchManifest = {
      format: 'bts-stitch',
      version: 1,
      hub: ref(this.hub, 'hub'),
      experts: this.experts.map((e, i) => ({ name: this.expertNames[i], ...ref(e, `expert '${this.expertNames[i]}'`) })),
      stitches: this.placement,
      expertStream: this.expertStream,
      hubBias: this.hubBias,
      gateDropout: this.gateDropout,
      seed: this.seed,
      init: this.init,
      dModel: this.hub.config.hiddenSize,
      numExperts: this.experts.length,
    };
    writeFileAtomic(path.join(dir, 'stitch.json'), JSON.stringify(man, null, 2) + '\n');
  }

  /** Number of experts n. */
  get numExperts(): number {
    return this.experts.length;
  }

  /** Trainable parameter count (= stitchParamCount(D, n, K)). */
  get numParams(): number {
    return this.params.length;
  }

  // --- TrainableModel ---------------------------------------------------------------------------

  get nDecay(): number {
    return this.params.length;
  }

  get maxPositions(): number {
    return this.hub.config.maxPositionEmbeddings;
  }

  zeroGrad(): void {
    this.grads.fill(0);
    if (this.handle && this.resolvedDevice === 'cuda') this.cudaGradsStale = true;
  }

  /** Forward and backward on the hub's next-token loss; stitch gradients ACCUMULATE. `step` seeds gate dropout. */
  async forwardBackward(inputs: Int32Array, targets: Int32Array, B: number, T: number, gradScale: number, step = 0): Promise<{ lossSum: number; count: number }> {
    this.checkBatch(inputs, targets, B, T);
    const engine = await this.ready();
    const r = await engine.forwardBackward(inputs, targets, B, T, gradScale, this.seed * 1_000_003 + step);
    if (this.resolvedDevice === 'cuda') await (engine as CudaStitched).downloadGrads(this.views(this.grads));
    if (this.trainableRanges) {
      // Zero the gradient outside the trainable slices (train only new experts' slices).
      let pos = 0;
      const ranges = [...this.trainableRanges].sort((a, b) => a[0] - b[0]);
      for (const [off, len] of ranges) {
        this.grads.fill(0, pos, off);
        pos = off + len;
      }
      this.grads.fill(0, pos);
    }
    return r;
  }

  /**
   * One AdamW step over every stitch parameter (what the trainer calls after accumulating
   * gradients), in place, with weight decay on all of them ({@link nDecay}). On the CPU: ops.adamwStep
   * over params, grads and the given moments, as the trainer's fallback. On CUDA: the device optimizer
   * (no gradient or weight upload per step; with {@link trainableRanges}, the masked host gradients are
   * uploaded first, so the device steps on exactly what the CPU would): the moments are uploaded on
   * the first step with a given pair of arrays and then live on the device, so `m` and `v` are stale
   * until {@link syncMoments}; the updated stitches are copied back into {@link params}.
   * @returns the global gradient norm before clipping.
   */
  async optimizerStep(o: OptimizerStepOptions): Promise<{ gradNorm: number }> {
    this.checkAlive();
    const n = this.params.length;
    if (!(o.m instanceof Float32Array) || !(o.v instanceof Float32Array) || o.m.length !== n || o.v.length !== n)
      throw new ShapeError(`optimizerStep: m and v must be Float32Arrays of params.length = ${n} elements`);
    if (this.device !== 'cuda') {
      const r = await adamwStepAsync({ params: this.params, grads: this.grads, m: o.m, v: o.v, lr: o.lr, beta1: o.beta1, beta2: o.beta2, eps: o.eps, weightDecay: o.weightDecay, nDecay: this.nDecay, step: o.step, maxGradNorm: o.maxGradNorm });
      this.syncPrecisionCopies();
      return { gradNorm: r.gradNorm };
    }
    const cuda = (await this.ready()) as CudaStitched;
    // The device sum is unmasked; the host copy was masked after every forwardBackward.
    const beforeStep = this.trainableRanges ? () => cuda.uploadGrads(this.views(this.grads)) : undefined;
    const gradNorm = await this.deviceMoments.step(cuda, (x) => this.views(x), this.params, o, beforeStep);
    return { gradNorm };
  }

  /**
   * Brings the host moment arrays given to {@link optimizerStep} up to date (CUDA: copies the device
   * optimizer's state into them; CPU: nothing to do). The trainer calls it before every checkpoint.
   */
  async syncMoments(m: Float32Array, v: Float32Array): Promise<void> {
    this.checkAlive();
    await this.deviceMoments.sync(this.handle as CudaStitched | null, (x) => this.views(x), m, v);
  }

  async loss(inputs: Int32Array, targets: Int32Array, B: number, T: number, losses: Float32Array | null = null): Promise<{ lossSum: number; count: number }> {
    this.checkBatch(inputs, targets, B, T);
    return (await this.ready()).loss(inputs, targets, B, T, losses);
  }

  /** Hub logits of every position [B*T, V]. */
  async logits(tokens: Int32Array, B: number, T: number): Promise<Float32Array> {
    checkTokens('tokens', tokens, this.vocabSize);
    if (tokens.length !== B * T) throw new ShapeError(`logits: tokens has ${tokens.length} elements, expected B*T = ${B * T}`);
    const out = new Float32Array(B * T * this.vocabSize);
    await (await this.ready()).logits(tokens, B, T, out);
    return out;
  }

  async saveCheckpointModel(dir: string): Promise<void> {
    await this.save(dir);
  }

  /**
   * Gate values over one text (the paper's Figure 3): [K, T, n+1], per stitch, per token, per model
   * the mean over hidden dims of the gate (E->H: softmax weights; H->E: expert sigmoid gates, slot 0 = 0).
   */
  async gates(tokens: Int32Array): Promise<Float32Array> {
    checkTokens('tokens', tokens, this.vocabSize);
    const out = new Float32Array(this.placement.length * tokens.length * (this.experts.length + 1));
    await (await this.ready()).gates(tokens, out);
    return out;
  }

  // --- CausalDecoder ----------------------------------------------------------------------------

  get vocabSize(): number {
    return this.hub.config.vocabSize;
  }
  get tokenizer() {
    return this.hub.tokenizer;
  }
  get eosTokenIds(): readonly number[] {
    return this.hub.config.eosTokenIds;
  }
  get bosTokenId(): number | null {
    return this.hub.config.bosTokenId;
  }

  createCache(slots: number, capacity: number): StitchCache {
    if (!Number.isSafeInteger(slots) || slots < 1) throw new ArgumentError(`createCache: slots must be a positive integer, got ${slots}`);
    if (!Number.isSafeInteger(capacity) || capacity < 1 || capacity > this.maxPositions) throw new ArgumentError(`createCache: capacity must be an integer in [1, ${this.maxPositions}], got ${capacity}`);
    const c = this.engine().createCache(slots, capacity);
    return { native: c, length: (s) => c.length(s), reset: (s) => c.reset(s), dispose: () => c.dispose() };
  }

  async prefill(cache: DecoderCache, slot: number, tokens: Int32Array, out: Float32Array): Promise<void> {
    checkTokens('tokens', tokens, this.vocabSize);
    await (await this.ready()).prefill((cache as StitchCache).native, slot, tokens, out);
  }

  async decode(cache: DecoderCache, slots: Int32Array, tokens: Int32Array, out: Float32Array): Promise<void> {
    checkTokens('tokens', tokens, this.vocabSize);
    await (await this.ready()).decode((cache as StitchCache).native, slots, tokens, out);
  }

  // --- Modularity -------------------------------------------------------------------------------

  /**
   * A stitched model without expert `e` (index or name): its projections and its gate rows (model
   * e+1 of every dim) are dropped, everything else is kept as trained. Shares the remaining models.
   */
  removeExpert(which: number | string): StitchedModel {
    this.checkAlive();
    const e = typeof which === 'number' ? which : this.expertNames.indexOf(which);
    if (!Number.isInteger(e) || e < 0 || e >= this.experts.length) throw new ArgumentError(`removeExpert: no expert ${JSON.stringify(which)} (have ${this.expertNames.join(', ')})`);
    if (this.experts.length === 1) throw new ArgumentError('removeExpert: cannot remove the only expert');
    const keep = this.experts.map((_, i) => i).filter((i) => i !== e);
    const m = new StitchedModel(this.hub, keep.map((i) => this.experts[i]), keep.map((i) => this.expertNames[i]), this.placement, this.opts(), null);
    m.deviceChoice = this.deviceChoice;
    const D = this.hub.config.hiddenSize;
    const Mold = this.experts.length + 1;
    const Mnew = Mold - 1;
    for (const t of m.tensors) {
      const dst = m.params.subarray(t.offset, t.offset + t.length);
      if (t.kind === 'proj') {
        const src = this.tensor(t.stitch, 'proj', keep[t.expert!]);
        dst.set(src);
      } else {
        const src = this.tensor(t.stitch, 'gate');
        const models = [0, ...keep.map((i) => i + 1)];
        for (let d = 0; d < D; d++)
          for (let mm = 0; mm < Mnew; mm++) dst.set(src.subarray(gateRow(d, models[mm], Mold - 1) * D, (gateRow(d, models[mm], Mold - 1) + 1) * D), gateRow(d, mm, Mnew - 1) * D);
      }
    }
    return m;
  }

  /**
   * A stitched model with one more expert: its projections and gate rows are initialised by the init
   * rule (identity projections, zero gate rows); the existing slices are copied. With
   * `trainOnlyNew` (default true) training updates only the new slices.
   */
  addExpert(model: LlamaModel, name = `expert-${this.experts.length}`, options: { trainOnlyNew?: boolean } = {}): StitchedModel {
    this.checkAlive();
    if (this.expertNames.includes(name)) throw new ArgumentError(`addExpert: an expert named '${name}' already exists`);
    const n = this.experts.length;
    const m = new StitchedModel(this.hub, [...this.experts, model], [...this.expertNames, name], this.placement, this.opts(), null);
    m.deviceChoice = this.deviceChoice;
    const D = this.hub.config.hiddenSize;
    const ranges: [number, number][] = [];
    for (const t of m.tensors) {
      const dst = m.params.subarray(t.offset, t.offset + t.length);
      if (t.kind === 'proj') {
        if (t.expert! < n) dst.set(this.tensor(t.stitch, 'proj', t.expert!));
        else {
          for (let i = 0; i < D; i++) dst[i * D + i] = 1;
          ranges.push([t.offset, t.length]);
        }
      } else {
        const src = this.tensor(t.stitch, 'gate');
        for (let d = 0; d < D; d++) {
          for (let mm = 0; mm <= n; mm++) dst.set(src.subarray(gateRow(d, mm, n) * D, (gateRow(d, mm, n) + 1) * D), gateRow(d, mm, n + 1) * D);
          ranges.push([t.offset + gateRow(d, n + 1, n + 1) * D, D]); // the new model's row stays 0
        }
      }
    }
    if (options.trainOnlyNew ?? true) m.trainableRanges = ranges;
    return m;
  }

  /** A stitch tensor by stitch index and kind (a view into params). */
  tensor(k: number, kind: 'proj' | 'gate', expert?: number): Float32Array {
    const t = this.tensors.find((x) => x.stitch === k && x.kind === kind && (kind === 'gate' || x.expert === expert));
    if (!t) throw new ArgumentError(`no stitch tensor ${kind} for stitch ${k}${kind === 'proj' ? ` expert ${expert}` : ''}`);
    return this.params.subarray(t.offset, t.offset + t.length);
  }

  /**
   * Where the engine runs: 'cpu' or 'cuda' (resolving the choice on first use; 'auto' without a usable
   * GPU resolves to 'cpu', saying why once on stderr; 'cuda' without one throws DeviceUnavailableError).
   */
  get device(): 'cpu' | 'cuda' {
    this.checkAlive();
    this.resolvedDevice ??= resolveDevice(this.deviceChoice);
    return this.resolvedDevice;
  }

  /**
   * Moves the engine to another device (the next call creates it there; nothing is lost: the host
   * arrays are the master copy). Caches made on the old engine are invalid afterwards.
   */
  setDevice(device: Device): void {
    this.checkAlive();
    checkDevice(device, 'setDevice: device');
    this.deviceMoments.checkSynced('setDevice');
    this.handle?.dispose();
    this.handle = null;
    this.deviceMoments.reset();
    this.deviceChoice = device;
    this.resolvedDevice = null;
  }

  /**
   * Call after changing {@link params} in place (the trainer does, after every optimizer step): on
   * CUDA it marks the device copy of the stitches for upload before the next engine call (the CPU
   * engine reads the arrays in place: nothing to do).
   */
  syncPrecisionCopies(): void {
    if (this.handle && this.resolvedDevice === 'cuda') this.cudaWeightsStale = true;
  }

  /** Views of a flat stitch buffer (params or grads) by stitch tensor name. */
  private views(flat: Float32Array): Record<string, Float32Array> {
    const out: Record<string, Float32Array> = {};
    for (const t of this.tensors) out[t.name] = flat.subarray(t.offset, t.offset + t.length);
    return out;
  }

  /** The engine, with the CUDA copy of the stitches and gradients brought up to date. */
  private async ready(): Promise<NativeStitched> {
    const engine = this.engine();
    if (this.resolvedDevice !== 'cuda') return engine;
    const cuda = engine as CudaStitched;
    if (this.cudaWeightsStale) {
      await cuda.uploadWeights(this.views(this.params));
      this.cudaWeightsStale = false;
    }
    if (this.cudaGradsStale) {
      await cuda.zeroGrads();
      this.cudaGradsStale = false;
    }
    return cuda;
  }

  /** The native handle (created on first use, on {@link device}). */
  engine(): NativeStitched {
    this.checkAlive();
    if (this.handle) return this.handle;
    const spec = { stitches: this.placement, expertStream: this.expertStream, hubBias: this.hubBias, gateDropout: this.gateDropout };
    if (this.device === 'cuda') {
      // The device gradients start at zero; host gradients that are not would be silently lost.
      if (this.grads.some((g) => g !== 0)) throw new UnsupportedFeatureError('StitchedModel: the CUDA engine starts from zero gradients but grads holds non-zero values; call zeroGrad() first');
      const f32 = (m: LlamaModel): Record<string, Float32Array> => Object.fromEntries(Object.keys(m.nativeWeights()).map((name) => [name, m.tensorF32(name)]));
      this.handle = cudaStitchedCreate(this.hub.config, f32(this.hub), this.experts.map(f32), spec, this.views(this.params), { grads: true });
      this.cudaWeightsStale = false;
      this.cudaGradsStale = false;
      return this.handle;
    }
    const weights = this.views(this.params);
    const grads = this.views(this.grads);
    this.handle = stitchedCreate(
      this.hub.config,
      // Mapped members go to the engine as mapped tensors (the model keeps the mappings).
      this.hub.nativeWeights(),
      this.experts.map((e) => e.nativeWeights()),
      spec,
      weights,
      grads,
    );
    return this.handle;
  }

  /**
   * Releases the native handle. The hub and experts are disposed too when this model loaded them
   * (StitchedModel.load); models passed to create() belong to the caller (see disposeAll).
   */
  dispose(): void {
    if (this.disposed) return;
    this.handle?.dispose();
    this.handle = null;
    this.disposed = true;
    if (this.ownsMembers) {
      this.hub.dispose();
      for (const e of this.experts) e.dispose();
    }
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  /** Disposes this model and its hub and experts. */
  disposeAll(): void {
    this.dispose();
    this.hub.dispose();
    for (const e of this.experts) e.dispose();
  }

  /** True when dispose() also frees the hub and experts (they were loaded by StitchedModel.load). */
  get ownsMemberModels(): boolean {
    return this.ownsMembers;
  }

  private opts() {
    return { expertStream: this.expertStream, hubBias: this.hubBias, gateDropout: this.gateDropout, seed: this.seed, init: this.init };
  }

  private initSlices(ts: readonly (StitchTensorSpec & { offset: number; length: number })[], init: string, seed: number): void {
    const D = this.hub.config.hiddenSize;
    const rng = new Rng(seed, 7);
    for (const t of ts) {
      const v = this.params.subarray(t.offset, t.offset + t.length);
      if (init === 'random') rng.fillNormal(v, 0.02);
      else if (t.kind === 'proj') {
        v.fill(0);
        for (let i = 0; i < D; i++) v[i * D + i] = 1;
      } else v.fill(0);
    }
  }

  private checkAlive(): void {
    if (this.disposed) throw new DisposedError('StitchedModel: used after dispose()');
  }

  private checkBatch(inputs: Int32Array, targets: Int32Array, B: number, T: number): void {
    this.checkAlive();
    if (!Number.isSafeInteger(B) || B < 1 || !Number.isSafeInteger(T) || T < 1) throw new ArgumentError(`B and T must be positive integers, got B=${B} T=${T}`);
    if (inputs.length !== B * T || targets.length !== B * T) throw new ShapeError(`inputs/targets have ${inputs.length}/${targets.length} elements, expected B*T = ${B * T}`);
    if (T > this.maxPositions) throw new ArgumentError(`T = ${T} exceeds the model's ${this.maxPositions} positions`);
    checkTokens('inputs', inputs, this.vocabSize);
    checkTokens('targets', targets, this.vocabSize, true);
  }
}

/** Reads and validates `dir/stitch.json`. */
export function readManifest(dir: string): StitchManifest {
  const file = path.join(dir, 'stitch.json');
  if (!fs.existsSync(file)) throw new FormatError(`${dir}: no stitch.json (not a stitched model directory)`);
  let j: Record<string, unknown>;
  try {
    j = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    throw new FormatError(`${file}: not valid JSON (${(e as Error).message})`);
  }
  const bad = (what: string): never => {
    throw new FormatError(`${file}: ${what}`);
  };
  if (j.format !== 'bts-stitch') bad(`format is ${JSON.stringify(j.format)}, expected "bts-stitch"`);
  if (j.version !== 1) bad(`version ${JSON.stringify(j.version)} is not supported (1)`);
  const ref = (x: unknown, what: string): { path: string; sha256: string } => {
    const o = x as { path?: unknown; sha256?: unknown };
    if (!o || typeof o.path !== 'string' || typeof o.sha256 !== 'string' || !/^[0-9a-f]{64}$/.test(o.sha256)) bad(`${what} needs "path" and a hex "sha256"`);
    return { path: o.path as string, sha256: o.sha256 as string };
  };
  const hub = ref(j.hub, 'hub');
  if (!Array.isArray(j.experts) || j.experts.length === 0) bad('"experts" must be a non-empty array');
  const experts = (j.experts as unknown[]).map((e, i) => {
    const name = (e as { name?: unknown }).name;
    if (typeof name !== 'string' || !name) bad(`experts[${i}] needs a "name"`);
    return { name: name as string, ...ref(e, `experts[${i}]`) };
  });
  if (!Array.isArray(j.stitches) || j.stitches.length === 0) bad('"stitches" must be a non-empty array');
  const stitches = (j.stitches as unknown[]).map((s, i) => {
    const o = s as { afterBlock?: unknown; type?: unknown };
    if (!Number.isSafeInteger(o.afterBlock) || (o.type !== 'eh' && o.type !== 'he')) bad(`stitches[${i}] needs an integer "afterBlock" and "type" "eh" or "he"`);
    return { afterBlock: o.afterBlock as number, type: o.type as 'eh' | 'he' };
  });
  const expertStream = j.expertStream ?? 'projected';
  if (expertStream !== 'projected' && expertStream !== 'unchanged') bad(`expertStream ${JSON.stringify(expertStream)}`);
  const num = (k: string, d: number): number => {
    const v = j[k] ?? d;
    if (typeof v !== 'number' || !Number.isFinite(v)) bad(`"${k}" must be a number`);
    return v as number;
  };
  return {
    format: 'bts-stitch',
    version: 1,
    hub,
    experts,
    stitches,
    expertStream: expertStream as 'projected' | 'unchanged',
    hubBias: num('hubBias', 0),
    gateDropout: num('gateDropout', 0),
    seed: num('seed', 0),
    init: typeof j.init === 'string' ? j.init : 'identity-zero',
    dModel: num('dModel', 0),
    numExperts: num('numExperts', experts.length),
  };
}
