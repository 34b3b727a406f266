/**
 * The typed face of the CUDA Llama engine (native/cuda/engine/, binding native/cuda/engine/binding.cc,
 * in the CUDA addon bts_cuda.node): the same object API as the CPU engine's {@link NativeLlama}
 * (lib/engine/native.ts) for loss, logits, forwardBackward, KV caches, prefill and decode, so code
 * written against `NativeLlama` runs on either engine; plus what a device-resident model needs
 * instead of borrowed host gradient arrays: gradients live on the GPU (accumulated by
 * forwardBackward), {@link CudaLlama.downloadGrads} copies them into host arrays,
 * {@link CudaLlama.zeroGrads} clears them and {@link CudaLlama.uploadWeights} replaces weights (so a
 * host-side optimizer can drive training); {@link CudaLlama.adamwStep} is the device-side optimizer
 * (moments on the GPU, moved by {@link CudaLlama.uploadMoments} / {@link CudaLlama.downloadMoments}
 * for checkpoints), so a training step needs no weight or gradient transfer at all.
 *
 * Differences from the CPU engine, by design:
 * - Weights are COPIED to the device at creation (the CPU engine borrows the arrays and sees in-place
 *   updates; here, call uploadWeights after changing them).
 * - fp32 weights only (Float32Array): bf16 (Uint16Array) and mapped weights are refused with
 *   UnsupportedFeatureError. Gradients are chosen with `options.grads` (true, or a list of names)
 *   instead of passed arrays.
 * - Classes are named CudaLlama / CudaKvCache in error messages.
 *
 * The addon comes from lib/device.ts (`cudaAddon()`: probed in a child process first; `BTS_CUDA_PATH`
 * selects a binary, e.g. the emulated bts_cuda_emu.node in tests). Layout and legend as
 * lib/engine/native.ts: row-major, Linear weights [out, in]; B batch, T tokens, N = B*T, V vocab.
 * Known limits: see docs/CUDA.md ("The CUDA Llama engine"): verified only under the SIMT emulator so far.
 */
import { cudaAddon, type CudaAddon } from '../device.js';
import { ArgumentError, UnsupportedFeatureError } from '../errors.js';
import {
  CheckedModel,
  call,
  checkConfig,
  checkModelWeights,
  f32,
  i32,
  kind,
  posInt,
  sync,
  tensorNumel,
  type NativeLlama,
  type NativeLlamaConfig,
  type NativeLossSum,
  type NativeWeight,
} from './native.js';

/** Options of {@link cudaLlamaCreate}. */
export interface CudaLlamaOptions {
  /**
   * Which tensors get a gradient buffer on the device: `true` every tensor, a list of HF names those
   * only, `false` none (a frozen model: forwardBackward rejects). Default false.
   */
  grads?: boolean | readonly string[];
}

/** A Llama model in the CUDA engine (from {@link cudaLlamaCreate}): a {@link NativeLlama} plus device transfers. */
export interface CudaLlama extends NativeLlama {
  /** The CUDA device index the model lives on (`BTS_CUDA_DEVICE`, default 0). */
  readonly device: number;
  /** The HF names of the tensors that have a gradient buffer, in tensor order. */
  gradNames(): string[];
  /** Replaces weights on the device by the given host arrays (Float32Arrays by HF name, any subset). */
  uploadWeights(weights: Record<string, Float32Array>): Promise<void>;
  /** Copies weights from the device into the given host arrays (by HF name, any subset). */
  downloadWeights(out: Record<string, Float32Array>): Promise<void>;
  /** Copies accumulated gradients into the given host arrays (by HF name, tensors with a gradient). */
  downloadGrads(out: Record<string, Float32Array>): Promise<void>;
  /** Sets every gradient buffer to 0 (between optimizer steps). */
  zeroGrads(): Promise<void>;
  /**
   * One AdamW step on the device over every tensor with a gradient, the semantics of
   * `ops.adamwStep` (global gradient-norm clipping, bias correction by `step`, weight decay on
   * matrices and embeddings only). The moments start at zero unless uploaded.
   * @returns the global gradient norm before clipping.
   */
  adamwStep(o: CudaAdamwOptions): Promise<number>;
  /** Replaces AdamW moments on the device (Float32Arrays by HF name of trained tensors, any subset). */
  uploadMoments(m: Record<string, Float32Array>, v: Record<string, Float32Array>): Promise<void>;
  /** Copies the device AdamW moments into host arrays (by HF name of trained tensors, any subset). */
  downloadMoments(m: Record<string, Float32Array>, v: Record<string, Float32Array>): Promise<void>;
  /** Bytes of device memory the model holds now: weights, gradients, moments and workspaces (caches not included). */
  deviceBytes(): number;
}

/** Hyper-parameters of {@link CudaLlama.adamwStep} (as ops.adamwStep's). */
export interface CudaAdamwOptions {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  /** Global gradient-norm clip; 0 disables. */
  maxGradNorm: number;
  /** 1-based step number (bias correction). */
  step: number;
}

/**
 * Checks the hyper-parameters of a device adamwStep (`w`: the method, for messages) and returns just
 * those fields (ArgumentError naming the field). Shared by the CUDA Llama and stitched faces. @internal
 */
export function checkAdamwOptions(w: string, o: CudaAdamwOptions): CudaAdamwOptions {
  if (typeof o !== 'object' || o === null) throw new ArgumentError(`${w}: expected { lr, beta1, beta2, eps, weightDecay, maxGradNorm, step }, got ${kind(o)}`);
  for (const k of ['lr', 'beta1', 'beta2', 'eps', 'weightDecay', 'maxGradNorm'] as const)
    if (typeof o[k] !== 'number' || !Number.isFinite(o[k])) throw new ArgumentError(`${w}: ${k} must be a finite number, got ${String(o[k])}`);
  if (!(o.beta1 >= 0 && o.beta1 < 1 && o.beta2 >= 0 && o.beta2 < 1)) throw new ArgumentError(`${w}: beta1 and beta2 must be in [0, 1), got ${o.beta1}, ${o.beta2}`);
  if (!(o.eps > 0)) throw new ArgumentError(`${w}: eps must be > 0, got ${o.eps}`);
  posInt(`${w}: step`, o.step);
  return { lr: o.lr, beta1: o.beta1, beta2: o.beta2, eps: o.eps, weightDecay: o.weightDecay, maxGradNorm: o.maxGradNorm, step: o.step };
}

/** The raw addon surface (native/cuda/engine/binding.cc): the same methods, unchecked. */
type RawCudaLlama = CudaLlama;
type CudaEngineAddon = CudaAddon & {
  llamaCreate?: (config: NativeLlamaConfig, weights: Record<string, Float32Array>, options: { grads: boolean | string[] }) => RawCudaLlama;
};

class CheckedCudaLlama extends CheckedModel<RawCudaLlama> implements CudaLlama {
  constructor(
    raw: RawCudaLlama,
    V: number,
    private readonly numel: ReadonlyMap<string, number>,
  ) {
    super(raw, V, 'CudaLlama', 'CudaKvCache', 'a CudaKvCache');
  }

  get device(): number {
    return this.raw.device;
  }

  forwardBackward(inputs: Int32Array, targets: Int32Array, B: number, T: number, gradScale: number): Promise<NativeLossSum> {
    return call(async () => {
      const w = 'CudaLlama.forwardBackward';
      const N = posInt(`${w}: B`, B) * posInt(`${w}: T`, T);
      i32(`${w}: inputs`, inputs, N, 'B*T');
      i32(`${w}: targets`, targets, N, 'B*T');
      if (typeof gradScale !== 'number' || !Number.isFinite(gradScale)) throw new ArgumentError(`${w}: gradScale must be a finite number, got ${String(gradScale)}`);
      return this.raw.forwardBackward(inputs, targets, B, T, gradScale);
    });
  }

  gradNames(): string[] {
    return sync(() => this.raw.gradNames());
  }

  adamwStep(o: CudaAdamwOptions): Promise<number> {
    return call(async () => {
      return this.raw.adamwStep(checkAdamwOptions('CudaLlama.adamwStep', o));
    });
  }

  uploadMoments(m: Record<string, Float32Array>, v: Record<string, Float32Array>): Promise<void> {
    return call(async () => this.raw.uploadMoments(this.tensors('uploadMoments: m', m), this.tensors('uploadMoments: v', v)));
  }

  downloadMoments(m: Record<string, Float32Array>, v: Record<string, Float32Array>): Promise<void> {
    return call(async () => this.raw.downloadMoments(this.tensors('downloadMoments: m', m), this.tensors('downloadMoments: v', v)));
  }

  /** Checks an object of Float32Arrays by HF name for `method`. */
  private tensors(method: string, t: Record<string, Float32Array>): Record<string, Float32Array> {
    const w = `CudaLlama.${method}`;
    if (typeof t !== 'object' || t === null || ArrayBuffer.isView(t) || Array.isArray(t))
      throw new ArgumentError(`${w}: expected an object of Float32Arrays by HF name, got ${kind(t)}`);
    for (const [name, a] of Object.entries(t)) {
      const n = this.numel.get(name);
      if (n === undefined) throw new ArgumentError(`${w}: '${name}' is not a tensor of this config`);
      f32(`${w}: ['${name}']`, a, n, 'numel');
    }
    return t;
  }

  uploadWeights(weights: Record<string, Float32Array>): Promise<void> {
    return call(async () => this.raw.uploadWeights(this.tensors('uploadWeights', weights)));
  }

  downloadWeights(out: Record<string, Float32Array>): Promise<void> {
    return call(async () => this.raw.downloadWeights(this.tensors('downloadWeights', out)));
  }

  downloadGrads(out: Record<string, Float32Array>): Promise<void> {
    return call(async () => this.raw.downloadGrads(this.tensors('downloadGrads', out)));
  }

  zeroGrads(): Promise<void> {
    return call(async () => this.raw.zeroGrads());
  }

  deviceBytes(): number {
    return sync(() => this.raw.deviceBytes());
  }
}

/**
 * Creates a model in the CUDA engine: checks everything, then copies the weights to the device
 * (synchronously; the arrays are not referenced afterwards).
 * @param config the architecture (a LlamaConfig from lib/formats/hf-config.ts works as is).
 * @param weights every tensor of `llamaTensorNames(config)` by HF name, as Float32Arrays.
 * @param options `grads`: true, a list of HF names, or false (default: frozen).
 * @throws DeviceUnavailableError when CUDA is not available (with the reason); UnsupportedFeatureError
 *   for bf16 or mapped weights, or a CUDA addon built without the engine; ArgumentError, DTypeError,
 *   ShapeError naming the tensor; InsufficientMemoryError when the device memory does not suffice.
 */
export function cudaLlamaCreate(config: NativeLlamaConfig, weights: Record<string, Float32Array>, options: CudaLlamaOptions = {}): CudaLlama {
  checkConfig(config);
  const numel = tensorNumel(config);
  checkModelWeights('llamaCreate', 'weights', weights as Record<string, NativeWeight>, numel, config.tieWordEmbeddings);
  for (const [name, w] of Object.entries(weights)) {
    const where = `llamaCreate: weights['${name}']`;
    if (w instanceof Uint16Array) throw new UnsupportedFeatureError(`${where} is bf16 (Uint16Array); the CUDA engine takes fp32 weights only (Float32Array)`);
    if (!(w instanceof Float32Array))
      throw new UnsupportedFeatureError(`${where}: mapped weights are not supported by the CUDA engine; pass a Float32Array (got ${kind(w)})`);
  }
  if (typeof options !== 'object' || options === null) throw new ArgumentError(`llamaCreate: options must be an object, got ${kind(options)}`);
  const g = options.grads ?? false;
  if (typeof g !== 'boolean') {
    if (!Array.isArray(g)) throw new ArgumentError(`llamaCreate: options.grads must be a boolean or an array of tensor names, got ${kind(g)}`);
    for (const name of g) if (!numel.has(name)) throw new ArgumentError(`llamaCreate: options.grads has '${String(name)}', not a tensor of this config`);
  }
  const addon = cudaAddon() as CudaEngineAddon;
  if (typeof addon.llamaCreate !== 'function')
    throw new UnsupportedFeatureError('llamaCreate: this CUDA addon was built without the CUDA engine; rebuild bts_cuda.node (docs/CUDA.md)');
  const create = addon.llamaCreate;
  const raw = sync(() => create(config, weights, { grads: typeof g === 'boolean' ? g : [...g] }));
  return new CheckedCudaLlama(raw, config.vocabSize, numel);
}
