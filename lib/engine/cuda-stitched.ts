/**
 * The typed face of the stitched model on the CUDA engine (native/cuda/engine/stitched.cu, binding
 * native/cuda/engine/stitched_binding.cc, in the CUDA addon bts_cuda.node): the same object API as
 * the CPU engine's {@link NativeStitched} (lib/engine/stitched-native.ts) for forwardBackward, loss,
 * logits, gates and KV-cached generation (createCache, prefill, decode: one device KV cache per model,
 * advanced together), so code written against `NativeStitched` trains and generates on either engine; plus what a
 * device-resident model needs instead of borrowed host arrays: the stitch gradients live on the GPU
 * (accumulated by forwardBackward), {@link CudaStitched.downloadGrads} copies them into host arrays,
 * {@link CudaStitched.zeroGrads} clears them and {@link CudaStitched.uploadWeights} replaces stitch
 * tensors (a host-side optimizer can drive training); {@link CudaStitched.adamwStep} is the device
 * optimizer (moments on the GPU, moved by {@link CudaStitched.uploadMoments} /
 * {@link CudaStitched.downloadMoments} for checkpoints).
 *
 * Differences from the CPU engine, by design:
 * - Hub, expert and stitch weights are COPIED to the device at creation (the CPU engine borrows the
 *   arrays and sees in-place updates; here, call uploadWeights after changing stitch tensors).
 * - fp32 weights only (Float32Array): bf16 (Uint16Array) and mapped weights are refused with
 *   UnsupportedFeatureError. Gradients are chosen with `options.grads` (true, or a list of stitch
 *   tensor names) instead of passed arrays.
 * - The classes are named CudaStitched and CudaStitchedCache in error messages.
 *
 * Semantics (stitched.h, shared with the CPU engine): next-token loss on the hub's output, stitch
 * gradients only, the same cost rules and the same gate-dropout mask for the same seed. Layout and
 * legend as lib/engine/stitched-native.ts: B batch, T tokens, N = B*T, V vocab, D hidden, n experts,
 * K stitches. Known limits: docs/CUDA.md ("The stitched model on CUDA"): verified under the SIMT
 * emulator only.
 */
import { cudaAddon, type CudaAddon } from '../device.js';
import { ArgumentError, ShapeError, UnsupportedFeatureError } from '../errors.js';
import { stitchTensorNames } from '../stitch/layout.js';
import {
  CheckedModel,
  call,
  checkConfig,
  checkModelWeights,
  f32,
  i32,
  kind,
  nonNegInt,
  posInt,
  sync,
  tensorNumel,
  type NativeLlamaConfig,
  type NativeLossSum,
  type NativeWeight,
} from './native.js';
import { checkAdamwOptions, type CudaAdamwOptions } from './cuda-native.js';
import { checkExpertConfigs, checkSpec, type NativeStitched, type NativeStitchSpec } from './stitched-native.js';

/** Options of {@link cudaStitchedCreate}. */
export interface CudaStitchedOptions {
  /**
   * Which stitch tensors get a gradient buffer on the device: `true` every one, a list of names
   * (`stitch.{k}.proj.{e}.weight`, `stitch.{k}.gate.weight`) those only, `false` none (frozen
   * stitches: forwardBackward rejects). Default false.
   */
  grads?: boolean | readonly string[];
  /** The experts' own configs, when known: each must equal `config` (see {@link checkExpertConfigs}). */
  expertConfigs?: NativeLlamaConfig[];
}

/** A stitched model in the CUDA engine (from {@link cudaStitchedCreate}): a {@link NativeStitched} plus device transfers. */
export interface CudaStitched extends NativeStitched {
  /** The CUDA device index the model lives on (`BTS_CUDA_DEVICE`, default 0). */
  readonly device: number;
  /** The names of the stitch tensors that have a gradient buffer, in tensor order. */
  gradNames(): string[];
  /** Replaces stitch tensors on the device by the given host arrays (Float32Arrays by name, any subset). */
  uploadWeights(weights: Record<string, Float32Array>): Promise<void>;
  /** Copies stitch tensors from the device into the given host arrays (by name, any subset). */
  downloadWeights(out: Record<string, Float32Array>): Promise<void>;
  /** Copies accumulated stitch gradients into the given host arrays (by name, tensors with a gradient). */
  downloadGrads(out: Record<string, Float32Array>): Promise<void>;
  /** Replaces accumulated stitch gradients by host arrays (by name, tensors with a gradient). */
  uploadGrads(grads: Record<string, Float32Array>): Promise<void>;
  /** Sets every stitch gradient to 0 (between optimizer steps). */
  zeroGrads(): Promise<void>;
  /**
   * One AdamW step on the device over every stitch tensor with a gradient, the semantics of
   * `ops.adamwStep` (global gradient-norm clipping, bias correction by `step`) with weight decay on
   * every element (a stitched model's nDecay is all of its parameters). The moments start at zero
   * unless uploaded.
   * @returns the global gradient norm before clipping.
   */
  adamwStep(o: CudaAdamwOptions): Promise<number>;
  /** Replaces AdamW moments on the device (Float32Arrays by name of stitch tensors with a gradient, any subset). */
  uploadMoments(m: Record<string, Float32Array>, v: Record<string, Float32Array>): Promise<void>;
  /** Copies the device AdamW moments into host arrays (by name, any subset). */
  downloadMoments(m: Record<string, Float32Array>, v: Record<string, Float32Array>): Promise<void>;
  /** Bytes of device memory the model holds now: every model's weights, stitch tensors, gradients, moments, workspaces (caches not included). */
  deviceBytes(): number;
}

/** The raw addon surface (stitched_binding.cc): the same methods, unchecked. */
type RawCudaStitched = CudaStitched;
type CudaStitchedAddon = CudaAddon & {
  stitchedCreate?: (
    config: NativeLlamaConfig,
    hub: Record<string, Float32Array>,
    experts: Record<string, Float32Array>[],
    spec: NativeStitchSpec,
    weights: Record<string, Float32Array>,
    options: { grads: boolean | string[] },
  ) => RawCudaStitched;
};

class CheckedCudaStitched extends CheckedModel<RawCudaStitched> implements CudaStitched {
  constructor(
    raw: RawCudaStitched,
    V: number,
    private readonly K: number,
    private readonly M: number,
    private readonly numel: ReadonlyMap<string, number>,
  ) {
    super(raw, V, 'CudaStitched', 'CudaStitchedCache', 'a CudaStitchedCache');
  }

  get device(): number {
    return this.raw.device;
  }

  forwardBackward(inputs: Int32Array, targets: Int32Array, B: number, T: number, gradScale: number, seed = 0): Promise<NativeLossSum> {
    return call(async () => {
      const w = 'CudaStitched.forwardBackward';
      const N = posInt(`${w}: B`, B) * posInt(`${w}: T`, T);
      i32(`${w}: inputs`, inputs, N, 'B*T');
      i32(`${w}: targets`, targets, N, 'B*T');
      if (typeof gradScale !== 'number' || !Number.isFinite(gradScale)) throw new ArgumentError(`${w}: gradScale must be a finite number, got ${String(gradScale)}`);
      nonNegInt(`${w}: seed`, seed);
      return this.raw.forwardBackward(inputs, targets, B, T, gradScale, seed);
    });
  }

  gates(tokens: Int32Array, out: Float32Array): Promise<void> {
    return call(async () => {
      i32('CudaStitched.gates: tokens', tokens);
      if (tokens.length < 1) throw new ShapeError('CudaStitched.gates: tokens must hold at least one id');
      f32('CudaStitched.gates: out', out, this.K * tokens.length * this.M, 'K*T*(n+1)');
      return this.raw.gates(tokens, out);
    });
  }

  gradNames(): string[] {
    return sync(() => this.raw.gradNames());
  }

  /** Checks an object of Float32Arrays by stitch tensor name for `method`. */
  private tensors(method: string, t: Record<string, Float32Array>): Record<string, Float32Array> {
    const w = `CudaStitched.${method}`;
    if (typeof t !== 'object' || t === null || ArrayBuffer.isView(t) || Array.isArray(t))
      throw new ArgumentError(`${w}: expected an object of Float32Arrays by stitch tensor name, got ${kind(t)}`);
    for (const [name, a] of Object.entries(t)) {
      const n = this.numel.get(name);
      if (n === undefined) throw new ArgumentError(`${w}: '${name}' is not a stitch tensor of this model`);
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

  uploadGrads(grads: Record<string, Float32Array>): Promise<void> {
    return call(async () => this.raw.uploadGrads(this.tensors('uploadGrads', grads)));
  }

  zeroGrads(): Promise<void> {
    return call(async () => this.raw.zeroGrads());
  }

  adamwStep(o: CudaAdamwOptions): Promise<number> {
    return call(async () => this.raw.adamwStep(checkAdamwOptions('CudaStitched.adamwStep', o)));
  }

  uploadMoments(m: Record<string, Float32Array>, v: Record<string, Float32Array>): Promise<void> {
    return call(async () => this.raw.uploadMoments(this.tensors('uploadMoments: m', m), this.tensors('uploadMoments: v', v)));
  }

  downloadMoments(m: Record<string, Float32Array>, v: Record<string, Float32Array>): Promise<void> {
    return call(async () => this.raw.downloadMoments(this.tensors('downloadMoments: m', m), this.tensors('downloadMoments: v', v)));
  }

  deviceBytes(): number {
    return sync(() => this.raw.deviceBytes());
  }
}

/** Throws UnsupportedFeatureError unless `w` is a Float32Array (the CUDA engine takes fp32 host arrays only). */
function fp32Only(where: string, w: unknown): void {
  if (w instanceof Uint16Array) throw new UnsupportedFeatureError(`${where} is bf16 (Uint16Array); the CUDA engine takes fp32 weights only (Float32Array)`);
  if (!(w instanceof Float32Array)) throw new UnsupportedFeatureError(`${where}: mapped weights are not supported by the CUDA engine; pass a Float32Array (got ${kind(w)})`);
}

/**
 * Creates a stitched model in the CUDA engine: checks everything, then copies the hub, the experts
 * and the stitch tensors to the device (synchronously; the arrays are not referenced afterwards).
 * @param config the architecture shared by the hub and every expert (a LlamaConfig works as is).
 * @param hub every tensor of `llamaTensorNames(config)` by HF name, as Float32Arrays. Frozen.
 * @param experts n >= 1 weight records of the same form, in expert order (expert e is model e+1).
 * @param spec placement and options; see {@link NativeStitchSpec}.
 * @param weights every stitch tensor of `stitchTensorNames(D, n, spec.stitches)` as a Float32Array.
 * @param options `grads` (default false: frozen) and `expertConfigs`; see {@link CudaStitchedOptions}.
 * @throws DeviceUnavailableError when CUDA is not available; UnsupportedFeatureError for bf16 or
 *   mapped weights, or a CUDA addon built without the stitched engine; ArgumentError, DTypeError,
 *   ShapeError naming the tensor or field; InsufficientMemoryError when device memory does not suffice.
 */
export function cudaStitchedCreate(
  config: NativeLlamaConfig,
  hub: Record<string, Float32Array>,
  experts: Record<string, Float32Array>[],
  spec: NativeStitchSpec,
  weights: Record<string, Float32Array>,
  options: CudaStitchedOptions = {},
): CudaStitched {
  checkConfig(config, 'stitchedCreate');
  if (!Array.isArray(experts) || experts.length < 1) throw new ArgumentError(`stitchedCreate: experts must be a non-empty array of weight records, got ${kind(experts)}`);
  if (typeof options !== 'object' || options === null) throw new ArgumentError(`stitchedCreate: options must be an object, got ${kind(options)}`);
  if (options.expertConfigs !== undefined) {
    if (!Array.isArray(options.expertConfigs) || options.expertConfigs.length !== experts.length)
      throw new ArgumentError(`stitchedCreate: options.expertConfigs must hold one config per expert (${experts.length})`);
    checkExpertConfigs(config, options.expertConfigs);
  }
  checkSpec(spec, config.numHiddenLayers);
  const numel = tensorNumel(config);
  const models: [string, Record<string, Float32Array>][] = [['hub', hub], ...experts.map((e, i): [string, Record<string, Float32Array>] => [`experts[${i}]`, e])];
  for (const [who, m] of models) {
    checkModelWeights('stitchedCreate', who, m as Record<string, NativeWeight>, numel, config.tieWordEmbeddings);
    for (const [name, w] of Object.entries(m)) fp32Only(`stitchedCreate: ${who}['${name}']`, w);
  }

  const n = experts.length;
  const stitchNumel = new Map(stitchTensorNames(config.hiddenSize, n, spec.stitches).map((t) => [t.name, t.shape[0] * t.shape[1]]));
  const describeSet = `stitch tensors of ${spec.stitches.length} stitches and ${n} experts`;
  if (typeof weights !== 'object' || weights === null) throw new ArgumentError(`stitchedCreate: weights must be an object by stitch tensor name, got ${kind(weights)}`);
  for (const name of Object.keys(weights)) if (!stitchNumel.has(name)) throw new ArgumentError(`stitchedCreate: weights has '${name}', not one of the ${describeSet}`);
  for (const [name, len] of stitchNumel) {
    if (weights[name] === undefined || weights[name] === null) throw new ArgumentError(`stitchedCreate: stitch tensor '${name}' is missing`);
    f32(`stitchedCreate: weights['${name}']`, weights[name], len, 'numel');
  }
  const g = options.grads ?? false;
  if (typeof g !== 'boolean') {
    if (!Array.isArray(g)) throw new ArgumentError(`stitchedCreate: options.grads must be a boolean or an array of stitch tensor names, got ${kind(g)}`);
    for (const name of g) if (!stitchNumel.has(name)) throw new ArgumentError(`stitchedCreate: options.grads has '${String(name)}', not one of the ${describeSet}`);
  }
  const addon = cudaAddon() as CudaStitchedAddon;
  if (typeof addon.stitchedCreate !== 'function')
    throw new UnsupportedFeatureError('stitchedCreate: this CUDA addon was built without the stitched engine; rebuild bts_cuda.node (docs/CUDA.md)');
  const create = addon.stitchedCreate;
  const raw = sync(() => create(config, hub, experts, spec, weights, { grads: typeof g === 'boolean' ? g : [...g] }));
  return new CheckedCudaStitched(raw, config.vocabSize, spec.stitches.length, n + 1, stitchNumel);
}
