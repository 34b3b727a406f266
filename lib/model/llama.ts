/**
 * LlamaModel: a Llama-architecture decoder held for training or inference, over the native engine.
 *
 * Two ways to hold the weights, chosen at load time:
 * - trainable (default): fp32 master weights copied into one flat Float32Array (./layout.ts), with a
 *   gradient buffer of the same layout. The trainer runs AdamW over the flat buffers. With
 *   `setPrecision('bf16')` the block matrices are also kept as bf16 copies that the engine computes
 *   with (bf16 operands, fp32 accumulation, fp32 master weights and gradients: mixed precision);
 *   `syncPrecisionCopies()` refreshes them after each optimizer step.
 * - frozen (`trainable: false`): no gradients, no copy where possible. A weight whose dtype on disk
 *   equals the requested one (`dtype`, default: as stored, bf16 or f32) is memory-mapped and used
 *   where it lies; others are converted once in memory. Norm gains are always fp32 (tiny).
 *
 * The model directory is a Hugging Face one: config.json, model.safetensors (or shards with
 * model.safetensors.index.json), tokenizer.json. Names and shapes are validated against the config
 * before any native call (FormatError naming the tensor).
 *
 * The native handle is created lazily and recreated when the set of arrays it computes with changes
 * (precision switch). Every long call is async (AsyncWorker in the binding); the compute pool runs one
 * native call at a time, so concurrent calls queue rather than fight for the cores.
 *
 * Device (`device: 'cpu' | 'cuda' | 'auto'`, default the process default of lib/device.ts, itself
 * 'cpu' unless `BTS_DEVICE` says otherwise; {@link LlamaModel.setDevice}): on 'cuda' the engine is the
 * device-resident CUDA engine (lib/engine/cuda-native.ts). The host arrays stay the master copy: the
 * device holds a copy of the weights (uploaded at engine creation and again before the next call after
 * {@link LlamaModel.syncPrecisionCopies}, which the trainer calls after every optimizer step) and the
 * gradient sum (zeroed by {@link LlamaModel.zeroGrad}, copied into {@link LlamaModel.grads} after every
 * forwardBackward); {@link LlamaModel.optimizerStep} runs AdamW on the device (moments there, copied
 * back by {@link LlamaModel.syncMoments}) and downloads the updated weights. CUDA limits: fp32 compute
 * only (bf16 mixed precision is refused; bf16 or mapped frozen weights are widened to fp32 on upload),
 * and verified only under the SIMT emulator so far (docs/CUDA.md).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ArgumentError, DisposedError, FormatError, ShapeError, TokenRangeError, UnsupportedFeatureError } from '../errors.js';
import { checkDevice, resolveDevice, type Device } from '../device.js';
import { cudaLlamaCreate, type CudaLlama } from '../engine/cuda-native.js';
import { DeviceMoments } from '../engine/device-moments.js';
import { loadLlamaConfig, llamaTensorNames, writeLlamaConfig, type LlamaConfig } from '../formats/hf-config.js';
import {
  bf16ToF32,
  f32ToBf16,
  openSafetensorsDir,
  writeSafetensorsAsync,
  type SafetensorsView,
  type TensorToWrite,
} from '../formats/safetensors.js';
import { loadTokenizerFile, type BpeTokenizer } from '../tokenizer/bpe.js';
import { llamaCreate, mapFile, type NativeKvCache, type NativeLlama, type NativeMappedFile, type NativeMappedWeight, type NativeWeight } from '../engine/native.js';
import type { CausalDecoder, DecoderCache } from '../infer/generate.js';
import { Rng } from '../util/random.js';
import { adamwStepAsync } from '../ops/adamw.js';
import { isBlockMatrix, llamaLayout, viewsOf, type ParamLayout } from './layout.js';

/** Options of {@link LlamaModel.load}. */
export interface LoadModelOptions {
  /** Hold fp32 master weights and gradients for training. Default true. */
  trainable?: boolean;
  /**
   * Frozen models only: the in-memory dtype of the matrices. Default: as stored on disk (bf16 stays
   * bf16, f32 stays f32; f16 becomes f32).
   */
  dtype?: 'f32' | 'bf16';
  /** Frozen models only: memory-map weights whose stored dtype is the in-memory one. Default true. */
  mmap?: boolean;
  /** Load `tokenizer.json` from the directory when present. Default true. */
  tokenizer?: boolean;
  /** Where the engine runs (see the file comment). Default: the process default (`BTS_DEVICE`, else 'cpu'). */
  device?: Device;
}

/** Options of {@link LlamaModel.random}. */
export interface RandomInitOptions {
  /** Seed of the weight init. Default 0. */
  seed?: number;
  /** Standard deviation of the normal init of matrices (transformers' initializer_range). Default 0.02. */
  initStd?: number;
  /** Tokenizer to attach (saved with the model). */
  tokenizer?: BpeTokenizer | null;
  /** Where the engine runs (see the file comment). Default: the process default (`BTS_DEVICE`, else 'cpu'). */
  device?: Device;
}

/** Options of {@link LlamaModel.save}. */
export interface SaveModelOptions {
  /** Stored dtype of the weights. Default 'f32' for trainable models, the in-memory dtype otherwise. */
  dtype?: 'f32' | 'bf16';
  /** Also write tokenizer.json (when the model has a tokenizer). Default true. */
  tokenizer?: boolean;
}

/** Sum of per-token losses and the number of tokens counted. */
export interface LossSum {
  lossSum: number;
  count: number;
}

/**
 * One optimizer step of {@link LlamaModel.optimizerStep}: the trainer's AdamW moments (flat, the
 * layout of {@link LlamaModel.params}) and hyper-parameters (the semantics of ops.adamwStep).
 */
export interface OptimizerStepOptions {
  /** First and second moments, [params.length] each. */
  m: Float32Array;
  v: Float32Array;
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  /** Decoupled weight decay of the matrices and embeddings (never the norm gains). */
  weightDecay: number;
  /** 1-based step number (bias correction). */
  step: number;
  /** Global gradient-norm clip; 0 disables. */
  maxGradNorm: number;
}

type Held = { kind: 'f32'; data: Float32Array } | { kind: 'bf16'; data: Uint16Array } | { kind: 'mapped'; weight: NativeMappedWeight; path: string };

/** Checks a token array: integers in [0, V). */
export function checkTokens(name: string, ids: Int32Array, vocabSize: number, allowIgnore = false): void {
  for (let i = 0; i < ids.length; i++) {
    const t = ids[i];
    if (t < 0 || t >= vocabSize) {
      if (allowIgnore && t === -100) continue;
      throw new TokenRangeError(`${name}[${i}] = ${t} is outside the vocabulary [0, ${vocabSize})`);
    }
  }
}

/** A Llama decoder for training or inference (see the file comment). Dispose it when done. */
export class LlamaModel implements Disposable, CausalDecoder {
  /** The architecture. */
  readonly config: LlamaConfig;
  /** The tokenizer, when the model has one. */
  tokenizer: BpeTokenizer | null;
  /** The directory the model was loaded from or last saved to, or null. */
  sourceDir: string | null = null;
  /** Flat layout (trainable models), else null. */
  readonly layout: ParamLayout | null;
  /** fp32 master weights in {@link layout} order (trainable models), else null. */
  readonly params: Float32Array | null;
  /** Gradients, same layout (trainable models), else null. Accumulated by {@link forwardBackward}. */
  readonly grads: Float32Array | null;
  private held: Map<string, Held>;
  private files: NativeMappedFile[];
  private handle: NativeLlama | null = null;
  private precision: 'f32' | 'bf16' = 'f32';
  private bf16Copies: Map<string, Uint16Array> | null = null;
  private disposed = false;
  /** The device asked for (undefined: the process default), resolved on first use. */
  private deviceChoice: Device | undefined = undefined;
  private resolvedDevice: 'cpu' | 'cuda' | null = null;
  /** CUDA engine: the host weights changed since the last upload / the device gradients must be zeroed. */
  private cudaWeightsStale = false;
  private cudaGradsStale = false;
  /**
   * CUDA engine: the moment arrays whose state the device optimizer holds (null: none), and whether
   * the device state is newer than those host arrays (steps since the last {@link syncMoments}).
   */
  private readonly deviceMoments = new DeviceMoments();

  private constructor(config: LlamaConfig, tokenizer: BpeTokenizer | null, layout: ParamLayout | null, params: Float32Array | null, held: Map<string, Held>, files: NativeMappedFile[]) {
    this.config = config;
    this.tokenizer = tokenizer;
    this.layout = layout;
    this.params = params;
    this.grads = layout ? new Float32Array(layout.size) : null;
    this.held = held;
    this.files = files;
  }

  /** True when the model holds fp32 master weights and gradients. */
  get trainable(): boolean {
    return this.params !== null;
  }

  /** Elements [0, nDecay) of {@link params} are matrices (weight-decayed); 0 for frozen models. */
  get nDecay(): number {
    return this.layout?.nDecay ?? 0;
  }

  /** Checkpoint writer of the trainer: the model directory in fp32. */
  async saveCheckpointModel(dir: string): Promise<void> {
    const source = this.sourceDir;
    await this.save(dir, { dtype: 'f32' });
    this.sourceDir = source; // a checkpoint folder is not where the model "lives"
  }

  /** Total parameter count. */
  get numParams(): number {
    return llamaLayout(this.config).size;
  }

  /** A trainable model with weights drawn like transformers' LlamaForCausalLM init (normal matrices, unit norms). */
  static random(config: LlamaConfig, options: RandomInitOptions = {}): LlamaModel {
    const layout = llamaLayout(config);
    const params = new Float32Array(layout.size);
    const rng = new Rng(options.seed ?? 0, 1);
    const std = options.initStd ?? 0.02;
    if (!(std >= 0)) throw new ArgumentError(`LlamaModel.random: initStd must be >= 0, got ${std}`);
    for (const s of layout.slots) {
      const v = params.subarray(s.offset, s.offset + s.length);
      if (s.decay) rng.fillNormal(v, std);
      else v.fill(1);
    }
    const model = LlamaModel.fromParams(config, params, options.tokenizer ?? null);
    if (options.device !== undefined) model.setDevice(options.device);
    return model;
  }

  /** A trainable model over the given flat fp32 weights (layout of {@link llamaLayout}; not copied). */
  static fromParams(config: LlamaConfig, params: Float32Array, tokenizer: BpeTokenizer | null = null): LlamaModel {
    const layout = llamaLayout(config);
    if (!(params instanceof Float32Array)) throw new ArgumentError('LlamaModel.fromParams: params must be a Float32Array');
    if (params.length !== layout.size) throw new ShapeError(`LlamaModel.fromParams: params has ${params.length} elements, the config needs ${layout.size}`);
    const held = new Map<string, Held>();
    for (const [name, data] of Object.entries(viewsOf(layout, params))) held.set(name, { kind: 'f32', data });
    return new LlamaModel(config, tokenizer, layout, params, held, []);
  }

  /**
   * Loads a Hugging Face model directory (config.json, safetensors, tokenizer.json).
   * Throws FormatError when a tensor is missing, has the wrong shape, or an unexpected dtype.
   */
  static async load(dir: string, options: LoadModelOptions = {}): Promise<LlamaModel> {
    const config = loadLlamaConfig(path.join(dir, 'config.json'));
    const tokenizer = options.tokenizer !== false && fs.existsSync(path.join(dir, 'tokenizer.json')) ? loadTokenizerFile(dir) : null;
    const trainable = options.trainable ?? true;
    if (trainable && options.dtype === 'bf16') throw new ArgumentError("LlamaModel.load: dtype 'bf16' is for frozen models (trainable models hold fp32 master weights; use setPrecision('bf16') for mixed precision)");
    // Lazy: validate the header and read each tensor on demand (mapped tensors are never read by JS).
    const st = openSafetensorsDir(dir, { load: 'lazy' });
    try {
      checkTensors(dir, config, st);
      if (trainable) {
        const layout = llamaLayout(config);
        const params = new Float32Array(layout.size);
        for (const s of layout.slots) params.set(st.getF32(s.name), s.offset);
        const model = LlamaModel.fromParams(config, params, tokenizer);
        model.sourceDir = path.resolve(dir);
        if (options.device !== undefined) model.setDevice(options.device);
        return model;
      }
      const mmap = options.mmap ?? true;
      const files = new Map<string, NativeMappedFile>();
      const held = new Map<string, Held>();
      for (const { name, shape } of llamaTensorNames(config)) {
        const info = st.tensors.get(name)!;
        const length = shape.reduce((a, b) => a * b, 1);
        if (shape.length === 1) {
          held.set(name, { kind: 'f32', data: Float32Array.from(st.getF32(name)) });
          continue;
        }
        const stored = info.dtype === 'BF16' ? 'bf16' : info.dtype === 'F32' ? 'f32' : null;
        const want = options.dtype ?? stored ?? 'f32';
        if (mmap && stored === want) {
          let file = files.get(info.file);
          if (!file) {
            file = mapFile(info.file);
            files.set(info.file, file);
          }
          held.set(name, { kind: 'mapped', weight: { file, offset: info.byteOffset, dtype: want, length }, path: info.file });
        } else if (want === 'bf16') {
          held.set(name, { kind: 'bf16', data: info.dtype === 'BF16' ? Uint16Array.from(st.get(name) as Uint16Array) : f32ToBf16(st.getF32(name)) });
        } else {
          held.set(name, { kind: 'f32', data: Float32Array.from(st.getF32(name)) });
        }
      }
      const model = new LlamaModel(config, tokenizer, null, null, held, [...files.values()]);
      model.sourceDir = path.resolve(dir);
      if (options.device !== undefined) model.setDevice(options.device);
      return model;
    } finally {
      st.close();
    }
  }

  /**
   * Writes the model as a Hugging Face directory: config.json, model.safetensors, tokenizer.json.
   * Each file is written atomically (temp file, then rename), config last.
   */
  async save(dir: string, options: SaveModelOptions = {}): Promise<void> {
    this.checkAlive();
    const dtype = options.dtype ?? (this.trainable ? 'f32' : this.storedDtype());
    fs.mkdirSync(dir, { recursive: true });
    const tensors: Record<string, TensorToWrite> = {};
    for (const { name, shape } of llamaTensorNames(this.config)) {
      const f32 = this.tensorF32(name);
      tensors[name] = dtype === 'bf16' && shape.length === 2 ? { dtype: 'BF16', shape, data: f32ToBf16(f32) } : { dtype: 'F32', shape, data: f32 };
    }
    await writeSafetensorsAsync(path.join(dir, 'model.safetensors'), tensors, { format: 'pt' });
    const index = path.join(dir, 'model.safetensors.index.json');
    if (fs.existsSync(index)) fs.rmSync(index); // a stale shard index would shadow the new single file
    if (options.tokenizer !== false && this.tokenizer) this.tokenizer.save(path.join(dir, 'tokenizer.json'));
    writeLlamaConfig(path.join(dir, 'config.json'), { ...this.config, torchDtype: dtype === 'bf16' ? 'bfloat16' : 'float32' });
    this.sourceDir = path.resolve(dir);
  }

  /** A weight as fp32 (a view for trainable and f32 models, a converted copy otherwise). */
  tensorF32(name: string): Float32Array {
    this.checkAlive();
    const h = this.held.get(name);
    if (!h) throw new ArgumentError(`LlamaModel: no weight named '${name}'`);
    if (h.kind === 'f32') return h.data;
    if (h.kind === 'bf16') return bf16ToF32(h.data);
    // Mapped: read the bytes from the file (the mapping belongs to the native side).
    const size = h.weight.dtype === 'bf16' ? 2 : 4;
    const bytes = Buffer.alloc(h.weight.length * size);
    const fd = fs.openSync(h.path, 'r');
    try {
      fs.readSync(fd, bytes, 0, bytes.length, h.weight.offset);
    } finally {
      fs.closeSync(fd);
    }
    const copy = new Uint8Array(bytes).buffer;
    return h.weight.dtype === 'bf16' ? bf16ToF32(new Uint16Array(copy)) : new Float32Array(copy);
  }

  /** A trainable fp32 copy of this model (the "branch" of BTS): same config and tokenizer, own buffers. */
  clone(): LlamaModel {
    this.checkAlive();
    const layout = llamaLayout(this.config);
    const params = new Float32Array(layout.size);
    for (const s of layout.slots) params.set(this.tensorF32(s.name), s.offset);
    const copy = LlamaModel.fromParams(this.config, params, this.tokenizer);
    copy.deviceChoice = this.deviceChoice;
    return copy;
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
    this.checkMomentsSynced('setDevice');
    this.dropHandle();
    this.deviceChoice = device;
    this.resolvedDevice = null;
  }

  /**
   * Compute precision of a trainable model: 'f32', or 'bf16' mixed precision (the block matrices are
   * used as bf16 copies of the fp32 masters; gradients, optimizer and everything else stay fp32).
   */
  setPrecision(precision: 'f32' | 'bf16'): void {
    this.checkAlive();
    if (precision !== 'f32' && precision !== 'bf16') throw new ArgumentError(`setPrecision: expected 'f32' or 'bf16', got '${precision}'`);
    if (!this.trainable) throw new ArgumentError('setPrecision applies to trainable models (frozen ones choose dtype at load)');
    if (precision === this.precision) return;
    if (precision === 'bf16' && this.device === 'cuda') throw new UnsupportedFeatureError("setPrecision('bf16'): bf16 mixed precision runs on the CPU engine only for now (the CUDA engine computes in fp32)");
    this.precision = precision;
    this.bf16Copies = precision === 'bf16' ? new Map() : null;
    if (this.bf16Copies) {
      for (const s of this.layout!.slots) if (isBlockMatrix(s.name)) this.bf16Copies.set(s.name, new Uint16Array(s.length));
      this.syncPrecisionCopies();
    }
    this.dropHandle();
  }

  /** The compute precision (see {@link setPrecision}). */
  getPrecision(): 'f32' | 'bf16' {
    return this.precision;
  }

  /**
   * Call after changing {@link params} in place (the trainer does, after every optimizer step):
   * refreshes the bf16 copies of mixed precision, and on CUDA marks the device copy of the weights for
   * upload before the next engine call.
   */
  syncPrecisionCopies(): void {
    if (this.handle && this.resolvedDevice === 'cuda') this.cudaWeightsStale = true;
    if (!this.bf16Copies) return;
    const views = viewsOf(this.layout!, this.params!);
    for (const [name, copy] of this.bf16Copies) f32ToBf16(views[name], copy);
  }

  /**
   * One AdamW step over every weight (what the trainer calls after accumulating gradients), in place.
   * On the CPU: the fused native op over params, grads and the given moments, then the bf16 copies of
   * mixed precision are refreshed. On CUDA: the device optimizer (no gradient or weight upload per
   * step): the moments are uploaded on the first step with a given pair of arrays and then live on the
   * device, so `m` and `v` are stale until {@link syncMoments}; the updated weights are copied back
   * into {@link params}, which stays the master copy.
   * @returns the global gradient norm before clipping.
   */
  async optimizerStep(o: OptimizerStepOptions): Promise<{ gradNorm: number }> {
    this.checkAlive();
    if (!this.params || !this.grads || !this.layout) throw new ArgumentError('optimizerStep: the model is frozen (load it with trainable: true)');
    const n = this.params.length;
    if (!(o.m instanceof Float32Array) || !(o.v instanceof Float32Array) || o.m.length !== n || o.v.length !== n)
      throw new ShapeError(`optimizerStep: m and v must be Float32Arrays of params.length = ${n} elements`);
    if (this.device !== 'cuda') {
      const r = await adamwStepAsync({ params: this.params, grads: this.grads, m: o.m, v: o.v, lr: o.lr, beta1: o.beta1, beta2: o.beta2, eps: o.eps, weightDecay: o.weightDecay, nDecay: this.nDecay, step: o.step, maxGradNorm: o.maxGradNorm });
      this.syncPrecisionCopies();
      return { gradNorm: r.gradNorm };
    }
    const cuda = (await this.ready()) as CudaLlama;
    const layout = this.layout;
    const gradNorm = await this.deviceMoments.step(cuda, (x) => viewsOf(layout, x), this.params, o);
    return { gradNorm };
  }

  /**
   * Brings the host moment arrays given to {@link optimizerStep} up to date (CUDA: copies the device
   * optimizer's state into them; CPU: nothing to do). The trainer calls it before every checkpoint.
   */
  async syncMoments(m: Float32Array, v: Float32Array): Promise<void> {
    this.checkAlive();
    await this.deviceMoments.sync(this.handle as CudaLlama | null, (x) => viewsOf(this.layout!, x), m, v);
  }

  /** Sets every gradient to zero. */
  zeroGrad(): void {
    this.checkAlive();
    if (!this.grads) throw new ArgumentError('zeroGrad: the model is frozen (no gradients)');
    this.grads.fill(0);
    if (this.handle && this.resolvedDevice === 'cuda') this.cudaGradsStale = true;
  }

  /**
   * The arrays the engine computes with, by HF name (bf16 copies in mixed precision). With
   * `mapped: false`, memory-mapped tensors are first read into memory (once; the model then keeps
   * the in-memory copy), for consumers that take typed arrays only.
   */
  nativeWeights(options: { mapped?: boolean } = {}): Record<string, NativeWeight> {
    this.checkAlive();
    if (options.mapped === false) {
      for (const [name, h] of this.held) {
        if (h.kind !== 'mapped') continue;
        const f32 = this.tensorF32(name);
        this.held.set(name, h.weight.dtype === 'bf16' ? { kind: 'bf16', data: f32ToBf16(f32) } : { kind: 'f32', data: f32 });
      }
    }
    const weights: Record<string, NativeWeight> = {};
    for (const [name, h] of this.held) {
      const copy = this.bf16Copies?.get(name);
      weights[name] = copy ?? (h.kind === 'mapped' ? h.weight : h.data);
    }
    return weights;
  }

  /** The native engine handle (created on first use, on {@link device}). */
  engine(): NativeLlama {
    this.checkAlive();
    if (this.handle) return this.handle;
    if (this.device === 'cuda') {
      if (this.precision === 'bf16') throw new UnsupportedFeatureError('LlamaModel: bf16 mixed precision runs on the CPU engine only for now');
      // The device gradients start at zero; host gradients that are not would be silently lost.
      if (this.grads && this.grads.some((g) => g !== 0)) throw new UnsupportedFeatureError('LlamaModel: the CUDA engine starts from zero gradients but grads holds non-zero values; call zeroGrad() first');
      const weights: Record<string, Float32Array> = {};
      for (const name of this.held.keys()) weights[name] = this.tensorF32(name);
      this.handle = cudaLlamaCreate(this.config, weights, { grads: this.grads !== null });
      this.cudaWeightsStale = false;
      this.cudaGradsStale = false;
      return this.handle;
    }
    const weights = this.nativeWeights();
    const grads = this.grads && this.layout ? viewsOf(this.layout, this.grads) : null;
    this.handle = llamaCreate(this.config, weights, grads);
    return this.handle;
  }

  /**
   * Forward and backward of a batch: gradients ACCUMULATE into {@link grads} (scaled by gradScale).
   * @param inputs [B*T] token ids; @param targets [B*T] ids or -100 (ignored).
   * @returns the summed loss and the number of counted targets.
   */
  async forwardBackward(inputs: Int32Array, targets: Int32Array, B: number, T: number, gradScale: number): Promise<LossSum> {
    if (!this.grads) throw new ArgumentError('forwardBackward: the model is frozen (load it with trainable: true)');
    this.checkBatch(inputs, targets, B, T);
    if (!Number.isFinite(gradScale)) throw new ArgumentError(`forwardBackward: gradScale must be finite, got ${gradScale}`);
    const engine = await this.ready();
    const r = await engine.forwardBackward(inputs, targets, B, T, gradScale);
    if (this.resolvedDevice === 'cuda') await (engine as CudaLlama).downloadGrads(viewsOf(this.layout!, this.grads));
    return r;
  }

  /** The engine, with the CUDA copy of the weights and gradients brought up to date. */
  private async ready(): Promise<NativeLlama> {
    const engine = this.engine();
    if (this.resolvedDevice !== 'cuda') return engine;
    const cuda = engine as CudaLlama;
    if (this.cudaWeightsStale) {
      const weights: Record<string, Float32Array> = {};
      for (const name of this.held.keys()) weights[name] = this.tensorF32(name);
      await cuda.uploadWeights(weights);
      this.cudaWeightsStale = false;
    }
    if (this.cudaGradsStale) {
      await cuda.zeroGrads();
      this.cudaGradsStale = false;
    }
    return cuda;
  }

  /** Forward only: the summed next-token loss of a batch (and optionally per-position losses). */
  async loss(inputs: Int32Array, targets: Int32Array, B: number, T: number, losses: Float32Array | null = null): Promise<LossSum> {
    this.checkBatch(inputs, targets, B, T);
    if (losses && losses.length !== B * T) throw new ShapeError(`loss: losses has ${losses.length} elements, expected B*T = ${B * T}`);
    return (await this.ready()).loss(inputs, targets, B, T, losses);
  }

  /** Logits of every position, [B*T, V] (full forward, no cache). */
  async logits(tokens: Int32Array, B: number, T: number): Promise<Float32Array> {
    this.checkShape('tokens', tokens, B, T);
    checkTokens('tokens', tokens, this.config.vocabSize);
    const out = new Float32Array(B * T * this.config.vocabSize);
    await (await this.ready()).logits(tokens, B, T, out);
    return out;
  }

  // --- CausalDecoder (KV-cached inference; lib/infer/generate.ts) ---------------------------------

  get vocabSize(): number {
    return this.config.vocabSize;
  }

  get maxPositions(): number {
    return this.config.maxPositionEmbeddings;
  }

  get eosTokenIds(): readonly number[] {
    return this.config.eosTokenIds;
  }

  get bosTokenId(): number | null {
    return this.config.bosTokenId;
  }

  /** A KV cache of `slots` sequences of up to `capacity` tokens each (fp32, per layer [slots, capacity, Hkv, Dh]). */
  createCache(slots: number, capacity: number): NativeKvCache {
    if (!Number.isSafeInteger(slots) || slots < 1) throw new ArgumentError(`createCache: slots must be a positive integer, got ${slots}`);
    if (!Number.isSafeInteger(capacity) || capacity < 1 || capacity > this.config.maxPositionEmbeddings)
      throw new ArgumentError(`createCache: capacity must be an integer in [1, ${this.config.maxPositionEmbeddings}], got ${capacity}`);
    return this.engine().createCache(slots, capacity);
  }

  /** Appends `tokens` to cache slot `slot`; writes the last position's logits to out [V]. */
  async prefill(cache: DecoderCache, slot: number, tokens: Int32Array, out: Float32Array): Promise<void> {
    checkTokens('tokens', tokens, this.config.vocabSize);
    if (out.length < this.config.vocabSize) throw new ShapeError(`prefill: out has ${out.length} elements, expected V = ${this.config.vocabSize}`);
    await (await this.ready()).prefill(cache as NativeKvCache, slot, tokens, out);
  }

  /** Appends tokens[i] to slot slots[i] for every i; writes logits [S, V]. */
  async decode(cache: DecoderCache, slots: Int32Array, tokens: Int32Array, out: Float32Array): Promise<void> {
    checkTokens('tokens', tokens, this.config.vocabSize);
    if (slots.length !== tokens.length) throw new ShapeError(`decode: ${slots.length} slots but ${tokens.length} tokens`);
    if (out.length < tokens.length * this.config.vocabSize) throw new ShapeError(`decode: out has ${out.length} elements, expected S*V = ${tokens.length * this.config.vocabSize}`);
    await (await this.ready()).decode(cache as NativeKvCache, slots, tokens, out);
  }

  /** Releases the native handle and mapped files. Idempotent. */
  dispose(): void {
    if (this.disposed) return;
    this.dropHandle();
    for (const f of this.files) f.dispose();
    this.files = [];
    this.disposed = true;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  private dropHandle(): void {
    if (this.handle) this.handle.dispose();
    this.handle = null;
    this.deviceMoments.reset();
  }

  /** Refuses to drop a CUDA engine whose optimizer state has not been copied back (it would be lost). */
  private checkMomentsSynced(what: string): void {
    this.deviceMoments.checkSynced(what);
  }

  private storedDtype(): 'f32' | 'bf16' {
    for (const h of this.held.values()) if (h.kind === 'bf16' || (h.kind === 'mapped' && h.weight.dtype === 'bf16')) return 'bf16';
    return 'f32';
  }

  private checkAlive(): void {
    if (this.disposed) throw new DisposedError('LlamaModel: used after dispose()');
  }

  private checkShape(name: string, a: Int32Array, B: number, T: number): void {
    if (!(a instanceof Int32Array)) throw new ArgumentError(`${name} must be an Int32Array`);
    if (!Number.isSafeInteger(B) || B < 1 || !Number.isSafeInteger(T) || T < 1) throw new ArgumentError(`B and T must be positive integers, got B=${B} T=${T}`);
    if (a.length !== B * T) throw new ShapeError(`${name} has ${a.length} elements, expected B*T = ${B}*${T} = ${B * T}`);
    if (T > this.config.maxPositionEmbeddings) throw new ArgumentError(`T = ${T} exceeds the model's maxPositionEmbeddings ${this.config.maxPositionEmbeddings}`);
  }

  private checkBatch(inputs: Int32Array, targets: Int32Array, B: number, T: number): void {
    this.checkAlive();
    this.checkShape('inputs', inputs, B, T);
    this.checkShape('targets', targets, B, T);
    checkTokens('inputs', inputs, this.config.vocabSize);
    checkTokens('targets', targets, this.config.vocabSize, true);
  }
}

/** Checks that `st` holds every tensor of the config with the right shape and a float dtype. */
function checkTensors(dir: string, config: LlamaConfig, st: SafetensorsView): void {
  for (const { name, shape } of llamaTensorNames(config)) {
    const info = st.tensors.get(name);
    if (!info) throw new FormatError(`${dir}: missing weight '${name}' (expected shape [${shape}])`);
    if (info.shape.join(',') !== shape.join(',')) throw new FormatError(`${dir}: weight '${name}' has shape [${info.shape}], the config needs [${shape}]`);
    if (!['F32', 'BF16', 'F16', 'F64'].includes(info.dtype)) throw new FormatError(`${dir}: weight '${name}' has dtype ${info.dtype}; expected F32, BF16 or F16`);
  }
}
