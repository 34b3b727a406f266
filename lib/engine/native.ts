/**
 * The typed low-level face of the native Llama engine (native/engine/, binding native/binding/engine.cc):
 * the interfaces of what the addon returns, and thin wrappers that check arguments in TypeScript
 * (types, lengths, integer-ness) before the native call and turn native error codes into the typed
 * errors of lib/errors.ts. Nothing more: models, training loops and generation live in lib/model,
 * lib/train and lib/infer.
 *
 * Layout (docs/ARCHITECTURE.md): row-major; Linear weights [out, in] as in Hugging Face; bf16 is the
 * upper half of an fp32 stored in a Uint16Array. Legend: B batch, T tokens per row, N = B*T, V vocab,
 * D hidden, L layers, S cache slots.
 *
 * Lifetimes: a NativeLlama keeps every array (and mapped file) it was given alive until dispose();
 * each async call keeps its own arrays alive until it settles. Calls on one model are serialised by
 * the compute pool; a KV cache accepts one prefill/decode at a time (await it before the next).
 * Mapped weights ({file, offset, dtype, length}) point into a read-only memory map of a file: the
 * addon never exposes foreign memory as an ArrayBuffer, so mapped tensors are only readable natively.
 */
import { ArgumentError, DTypeError, ShapeError, UnsupportedFeatureError, fromNative } from '../errors.js';
import { llamaTensorNames, type LlamaConfig } from '../formats/hf-config.js';
import { native } from '../native.js';

/** A read-only memory map of a file (from {@link mapFile}). */
export interface NativeMappedFile {
  /** Size of the file in bytes. */
  readonly byteLength: number;
  /** The path it was mapped from. */
  readonly path: string;
  /**
   * Drops this handle's share of the mapping: it is unmapped once no model uses it any more.
   * Idempotent. Models created before keep working.
   */
  dispose(): void;
}

/** A weight that lies in a mapped file: `length` elements of `dtype` starting `offset` bytes in. */
export interface NativeMappedWeight {
  file: NativeMappedFile;
  /** Byte offset in the file (a multiple of the element size). */
  offset: number;
  dtype: 'f32' | 'bf16';
  /** Number of elements (must equal the tensor's size). */
  length: number;
}

/** A weight: fp32, bf16 bits, or a tensor in a mapped file. */
export type NativeWeight = Float32Array | Uint16Array | NativeMappedWeight;

/** Llama 3 RoPE frequency scaling (the only scaling the engine implements). */
export interface NativeRopeScaling {
  type: 'llama3';
  factor: number;
  lowFreqFactor: number;
  highFreqFactor: number;
  originalMaxPositionEmbeddings: number;
}

/**
 * The fields of lib/formats/hf-config.ts `LlamaConfig` the engine reads (a LlamaConfig can be passed
 * as is; other fields are ignored). Other RoPE scaling types are refused (UnsupportedFeatureError).
 */
export interface NativeLlamaConfig {
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  numHiddenLayers: number;
  numAttentionHeads: number;
  numKeyValueHeads: number;
  headDim: number;
  rmsNormEps: number;
  ropeTheta: number;
  ropeScaling: null | NativeRopeScaling | { type: string };
  /** Longest sequence: training T and cache capacity are limited to it. */
  maxPositionEmbeddings: number;
  tieWordEmbeddings: boolean;
}

/** Summed loss over the counted targets (targets != -100) and their count. */
export interface NativeLossSum {
  lossSum: number;
  count: number;
}

/**
 * A KV cache: per layer K, V [S, capacity, Hkv, Dh] fp32 and a length per slot (from
 * {@link NativeLlama.createCache}).
 */
export interface NativeKvCache {
  /** Tokens held by `slot`. */
  length(slot: number): number;
  /** Empties `slot` (length 0). */
  reset(slot: number): void;
  /** Shortens `slot` to `length` tokens (0 <= length <= current length). */
  truncate(slot: number, length: number): void;
  /** Number of slots S. */
  readonly slots: number;
  /** Tokens per slot. */
  readonly capacity: number;
  /** Frees the cache memory (after a pending call settles). Idempotent; later use throws DisposedError. */
  dispose(): void;
}

/** A Llama model in the native engine (from {@link llamaCreate}). */
export interface NativeLlama {
  /**
   * Forward and backward of the next-token loss of inputs [B*T] against targets [B*T] (-100 =
   * ignored), positions 0..T-1 in every row. The gradient of gradScale * lossSum is ACCUMULATED into
   * the grads given to llamaCreate. Rejects with ArgumentError on a frozen model.
   */
  forwardBackward(inputs: Int32Array, targets: Int32Array, B: number, T: number, gradScale: number): Promise<NativeLossSum>;
  /** Forward only; `losses` [B*T] (optional) receives per-position losses (0 where ignored). */
  loss(inputs: Int32Array, targets: Int32Array, B: number, T: number, losses: Float32Array | null): Promise<NativeLossSum>;
  /** Full forward without cache: out [B*T*V] logits. */
  logits(tokens: Int32Array, B: number, T: number, out: Float32Array): Promise<void>;
  /** A KV cache of `slots` sequences of up to `capacity` (<= maxPositionEmbeddings) tokens. */
  createCache(slots: number, capacity: number): NativeKvCache;
  /** Appends tokens [T >= 1] to `slot`; out [V] (or longer: the first V) gets the last token's logits. */
  prefill(cache: NativeKvCache, slot: number, tokens: Int32Array, out: Float32Array): Promise<void>;
  /**
   * Appends tokens[i] to slots[i] for each i (distinct slots, any lengths) in one batched step;
   * out [R*V] (or longer) gets the logits, row i for slots[i].
   */
  decode(cache: NativeKvCache, slots: Int32Array, tokens: Int32Array, out: Float32Array): Promise<void>;
  /** Bytes of engine workspaces currently allocated (grow with the largest B*T seen). */
  workspaceBytes(): number;
  /** Frees workspaces and releases the arrays (after pending calls settle). Idempotent. */
  dispose(): void;
}

// ---------------------------------------------------------------------------------------------------
// Checks (exported for lib/engine/stitched-native.ts; not part of the package API)

/** A positive safe integer, or ArgumentError naming `where`. @internal */
export function posInt(where: string, v: unknown): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1) throw new ArgumentError(`${where} must be a positive integer, got ${String(v)}`);
  return v;
}

/** A non-negative safe integer, or ArgumentError naming `where`. @internal */
export function nonNegInt(where: string, v: unknown): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw new ArgumentError(`${where} must be a non-negative integer, got ${String(v)}`);
  return v;
}

/** A short name of a value's kind for error messages ('null', 'Float64Array', 'number', ...). @internal */
export function kind(v: unknown): string {
  if (v === null) return 'null';
  if (v === undefined) return 'undefined';
  return (v as object).constructor?.name ?? typeof v;
}

/** An Int32Array (of `len` elements, named `shape` in the error, when given): DTypeError / ShapeError. @internal */
export function i32(where: string, a: unknown, len?: number, shape?: string): Int32Array {
  if (!(a instanceof Int32Array)) throw new DTypeError(`${where} must be an Int32Array, got ${kind(a)}`);
  if (len !== undefined && a.length !== len) throw new ShapeError(`${where} has ${a.length} elements, expected ${shape} = ${len}`);
  return a;
}

/** A Float32Array of exactly (atLeast: at least) `len` elements when given: DTypeError / ShapeError. @internal */
export function f32(where: string, a: unknown, len?: number, shape?: string, atLeast = false): Float32Array {
  if (!(a instanceof Float32Array)) throw new DTypeError(`${where} must be a Float32Array, got ${kind(a)}`);
  if (len !== undefined && (atLeast ? a.length < len : a.length !== len))
    throw new ShapeError(`${where} has ${a.length} elements, expected ${atLeast ? 'at least ' : ''}${shape} = ${len}`);
  return a;
}

/**
 * Checks the fields of a NativeLlamaConfig the engine reads (`who` names the function in errors):
 * ArgumentError for a bad size or number, UnsupportedFeatureError for RoPE scaling other than llama3.
 * @internal
 */
export function checkConfig(c: NativeLlamaConfig, who = 'llamaCreate'): void {
  if (typeof c !== 'object' || c === null) throw new ArgumentError(`${who}: config must be an object, got ${kind(c)}`);
  for (const k of ['vocabSize', 'hiddenSize', 'intermediateSize', 'numHiddenLayers', 'numAttentionHeads', 'numKeyValueHeads', 'headDim', 'maxPositionEmbeddings'] as const)
    posInt(`${who}: config.${k}`, c[k]);
  if (typeof c.tieWordEmbeddings !== 'boolean') throw new ArgumentError(`${who}: config.tieWordEmbeddings must be a boolean, got ${String(c.tieWordEmbeddings)}`);
  if (c.numAttentionHeads % c.numKeyValueHeads !== 0)
    throw new ArgumentError(`${who}: config.numAttentionHeads (${c.numAttentionHeads}) must be a multiple of numKeyValueHeads (${c.numKeyValueHeads})`);
  if (c.headDim % 2 !== 0) throw new ArgumentError(`${who}: config.headDim must be even (RoPE pairs), got ${c.headDim}`);
  for (const k of ['rmsNormEps', 'ropeTheta'] as const)
    if (typeof c[k] !== 'number' || !Number.isFinite(c[k]) || c[k] <= 0) throw new ArgumentError(`${who}: config.${k} must be a positive finite number, got ${String(c[k])}`);
  const s = c.ropeScaling;
  if (s !== null && s !== undefined && (typeof s !== 'object' || s.type !== 'llama3'))
    throw new UnsupportedFeatureError(`${who}: config.ropeScaling type ${JSON.stringify((s as { type?: unknown })?.type)} is not supported by the native engine (supported: 'llama3', or null for plain RoPE)`);
}

/** The fields of NativeLlamaConfig the engine reads, in the order configs are compared. */
export const ENGINE_CONFIG_FIELDS = [
  'vocabSize',
  'hiddenSize',
  'intermediateSize',
  'numHiddenLayers',
  'numAttentionHeads',
  'numKeyValueHeads',
  'headDim',
  'rmsNormEps',
  'ropeTheta',
  'ropeScaling',
  'maxPositionEmbeddings',
  'tieWordEmbeddings',
] as const;

/** A field of {@link ENGINE_CONFIG_FIELDS}. */
export type EngineConfigField = (typeof ENGINE_CONFIG_FIELDS)[number];

/**
 * The first of `fields` (default: every field the engine reads) in which config `b` differs from
 * `a`, with both values as JSON (a missing value reads as null; ropeScaling is compared by value), or
 * null when they agree. Shared by the architecture checks of the stitched model and the model soup.
 */
export function configDifference(
  a: NativeLlamaConfig,
  b: NativeLlamaConfig,
  fields: readonly EngineConfigField[] = ENGINE_CONFIG_FIELDS,
): { field: EngineConfigField; a: string; b: string } | null {
  for (const field of fields) {
    const va = JSON.stringify(a[field] ?? null);
    const vb = JSON.stringify(b[field] ?? null);
    if (va !== vb) return { field, a: va, b: vb };
  }
  return null;
}

/**
 * Checks one model weight `where` (e.g. "llamaCreate: weights['model.norm.weight']") of `numel`
 * elements: a Float32Array, a Uint16Array (bf16 bits) or a mapped tensor {file, offset, dtype, length}.
 * @internal
 */
export function checkWeight(where: string, w: NativeWeight, numel: number): void {
  if (w instanceof Float32Array || w instanceof Uint16Array) {
    if (w.length !== numel) throw new ShapeError(`${where} has ${w.length} elements, expected numel = ${numel}`);
    return;
  }
  if (typeof w !== 'object' || w === null || ArrayBuffer.isView(w))
    throw new DTypeError(`${where} must be a Float32Array, a Uint16Array (bf16) or {file, offset, dtype, length}, got ${kind(w)}`);
  if (w.dtype !== 'f32' && w.dtype !== 'bf16') throw new DTypeError(`${where}.dtype must be 'f32' or 'bf16', got ${String(w.dtype)}`);
  nonNegInt(`${where}.offset`, w.offset);
  if (nonNegInt(`${where}.length`, w.length) !== numel) throw new ShapeError(`${where}.length is ${w.length}, expected numel = ${numel}`);
  if (typeof w.file !== 'object' || w.file === null || typeof w.file.byteLength !== 'number')
    throw new ArgumentError(`${where}.file must be a NativeMappedFile (from mapFile), got ${kind(w.file)}`);
}

/**
 * Checks a model's weights `arg` of function `who` (e.g. "stitchedCreate", "experts[1]"): an object
 * holding every tensor of `numel` (name -> element count) and nothing else, each as {@link checkWeight}.
 * @internal
 */
export function checkModelWeights(who: string, arg: string, weights: Record<string, NativeWeight>, numel: ReadonlyMap<string, number>, tie: boolean): void {
  if (typeof weights !== 'object' || weights === null || ArrayBuffer.isView(weights) || Array.isArray(weights))
    throw new ArgumentError(`${who}: ${arg} must be an object of tensors by HF name, got ${kind(weights)}`);
  for (const name of Object.keys(weights))
    if (!numel.has(name))
      throw new ArgumentError(
        `${who}: ${arg} has '${name}', not a tensor of this config${tie && name === 'lm_head.weight' ? ' (tieWordEmbeddings: the LM head is model.embed_tokens.weight)' : ''}`,
      );
  for (const [name, n] of numel) {
    const w = weights[name];
    if (w === undefined || w === null) throw new ArgumentError(`${who}: ${arg}: weight '${name}' is missing`);
    checkWeight(`${who}: ${arg}['${name}']`, w, n);
  }
}

/** Runs an async native call, turning native errors into the typed errors of lib/errors.ts. @internal */
export async function call<R>(fn: () => Promise<R>): Promise<R> {
  try {
    return await fn();
  } catch (e) {
    throw fromNative(e);
  }
}

/** Runs a synchronous native call, turning native errors into the typed errors of lib/errors.ts. @internal */
export function sync<R>(fn: () => R): R {
  try {
    return fn();
  } catch (e) {
    throw fromNative(e);
  }
}

// ---------------------------------------------------------------------------------------------------
// Wrappers

/**
 * A KV cache with its arguments checked in TypeScript; `cls` names the native class in errors
 * ('NativeKvCache', 'NativeStitchedCache'). Used by both engine faces. @internal
 */
export class CheckedKvCache implements NativeKvCache, Disposable {
  constructor(
    readonly raw: NativeKvCache,
    private readonly cls = 'NativeKvCache',
  ) {}
  length(slot: number): number {
    return sync(() => this.raw.length(nonNegInt(`${this.cls}.length: slot`, slot)));
  }
  reset(slot: number): void {
    sync(() => this.raw.reset(nonNegInt(`${this.cls}.reset: slot`, slot)));
  }
  truncate(slot: number, length: number): void {
    sync(() => this.raw.truncate(nonNegInt(`${this.cls}.truncate: slot`, slot), nonNegInt(`${this.cls}.truncate: length`, length)));
  }
  get slots(): number {
    return this.raw.slots;
  }
  get capacity(): number {
    return this.raw.capacity;
  }
  dispose(): void {
    this.raw.dispose();
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}

/**
 * The native cache behind `c` (a {@link CheckedKvCache} or a raw one): ArgumentError naming `where`
 * and the expected kind (`what`) for a non-object. The native side checks the class. @internal
 */
export function rawCache(where: string, c: unknown, what = 'a NativeKvCache'): NativeKvCache {
  if (c instanceof CheckedKvCache) return c.raw;
  if (typeof c !== 'object' || c === null) throw new ArgumentError(`${where}: cache must be ${what} (from createCache), got ${kind(c)}`);
  return c as NativeKvCache;
}

/** The calls a native Llama and a native stitched model share (all but the training step). */
export type NativeModelCalls = Omit<NativeLlama, 'forwardBackward'>;

/**
 * The shared checked calls of a native model (`cls`: 'NativeLlama', 'NativeStitched'; V its vocabulary;
 * caches wrapped as `cacheCls`, `cacheWhat` naming them in errors). Subclasses add the training step.
 * @internal
 */
export class CheckedModel<R extends NativeModelCalls> implements NativeModelCalls, Disposable {
  constructor(
    protected readonly raw: R,
    protected readonly V: number,
    protected readonly cls: string,
    private readonly cacheCls = 'NativeKvCache',
    private readonly cacheWhat = 'a NativeKvCache',
  ) {}

  loss(inputs: Int32Array, targets: Int32Array, B: number, T: number, losses: Float32Array | null = null): Promise<NativeLossSum> {
    return call(async () => {
      const w = `${this.cls}.loss`;
      const N = posInt(`${w}: B`, B) * posInt(`${w}: T`, T);
      i32(`${w}: inputs`, inputs, N, 'B*T');
      i32(`${w}: targets`, targets, N, 'B*T');
      if (losses !== null && losses !== undefined) f32(`${w}: losses`, losses, N, 'B*T');
      return this.raw.loss(inputs, targets, B, T, losses ?? null);
    });
  }

  logits(tokens: Int32Array, B: number, T: number, out: Float32Array): Promise<void> {
    return call(async () => {
      const w = `${this.cls}.logits`;
      const N = posInt(`${w}: B`, B) * posInt(`${w}: T`, T);
      i32(`${w}: tokens`, tokens, N, 'B*T');
      f32(`${w}: out`, out, N * this.V, 'B*T*V');
      return this.raw.logits(tokens, B, T, out);
    });
  }

  createCache(slots: number, capacity: number): NativeKvCache {
    posInt(`${this.cls}.createCache: slots`, slots);
    posInt(`${this.cls}.createCache: capacity`, capacity);
    return new CheckedKvCache(
      sync(() => this.raw.createCache(slots, capacity)),
      this.cacheCls,
    );
  }

  prefill(cache: NativeKvCache, slot: number, tokens: Int32Array, out: Float32Array): Promise<void> {
    return call(async () => {
      const w = `${this.cls}.prefill`;
      const c = rawCache(w, cache, this.cacheWhat);
      nonNegInt(`${w}: slot`, slot);
      i32(`${w}: tokens`, tokens);
      if (tokens.length < 1) throw new ShapeError(`${w}: tokens must hold at least one id`);
      f32(`${w}: out`, out, this.V, 'V', true);
      return this.raw.prefill(c, slot, tokens, out);
    });
  }

  decode(cache: NativeKvCache, slots: Int32Array, tokens: Int32Array, out: Float32Array): Promise<void> {
    return call(async () => {
      const w = `${this.cls}.decode`;
      const c = rawCache(w, cache, this.cacheWhat);
      i32(`${w}: slots`, slots);
      if (slots.length < 1) throw new ShapeError(`${w}: slots must hold at least one slot`);
      i32(`${w}: tokens`, tokens, slots.length, 'slots.length');
      f32(`${w}: out`, out, slots.length * this.V, 'slots.length*V', true);
      return this.raw.decode(c, slots, tokens, out);
    });
  }

  workspaceBytes(): number {
    return sync(() => this.raw.workspaceBytes());
  }

  dispose(): void {
    this.raw.dispose();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

class CheckedLlama extends CheckedModel<NativeLlama> implements NativeLlama {
  constructor(raw: NativeLlama, V: number) {
    super(raw, V, 'NativeLlama');
  }

  forwardBackward(inputs: Int32Array, targets: Int32Array, B: number, T: number, gradScale: number): Promise<NativeLossSum> {
    return call(async () => {
      const N = posInt('NativeLlama.forwardBackward: B', B) * posInt('NativeLlama.forwardBackward: T', T);
      i32('NativeLlama.forwardBackward: inputs', inputs, N, 'B*T');
      i32('NativeLlama.forwardBackward: targets', targets, N, 'B*T');
      if (typeof gradScale !== 'number' || !Number.isFinite(gradScale)) throw new ArgumentError(`NativeLlama.forwardBackward: gradScale must be a finite number, got ${String(gradScale)}`);
      return this.raw.forwardBackward(inputs, targets, B, T, gradScale);
    });
  }
}

/** Element count of every tensor of `config` by HF name (llamaTensorNames). @internal */
export function tensorNumel(config: NativeLlamaConfig): Map<string, number> {
  return new Map(llamaTensorNames(config as LlamaConfig).map((s) => [s.name, s.shape.reduce((a, b) => a * b, 1)]));
}

/**
 * Creates a model in the native engine over the given arrays (no copy; they must stay unchanged in
 * shape, and the engine reads their current values at every call, so in-place optimizer updates are
 * seen). Checks everything before the native call.
 * @param config the architecture (a LlamaConfig from lib/formats/hf-config.ts works as is).
 * @param weights every tensor of `llamaTensorNames(config)` by HF name: Float32Array, Uint16Array
 *   (bf16 bits) or a mapped tensor. Norm weights may be bf16 only when frozen (widened once).
 * @param grads null for a frozen model, or Float32Arrays by HF name (a subset: missing names are
 *   frozen tensors). Gradients accumulate (+=); zero them between optimizer steps. A trained LM head
 *   (or tied embedding) must be fp32.
 * @throws ArgumentError, DTypeError, ShapeError naming the tensor; UnsupportedFeatureError for RoPE
 *   scaling other than llama3.
 */
export function llamaCreate(config: NativeLlamaConfig, weights: Record<string, NativeWeight>, grads: Record<string, Float32Array> | null): NativeLlama {
  checkConfig(config);
  const numel = tensorNumel(config);
  checkModelWeights('llamaCreate', 'weights', weights, numel, config.tieWordEmbeddings);
  if (grads !== null && grads !== undefined) {
    if (typeof grads !== 'object') throw new ArgumentError(`llamaCreate: grads must be null or an object by HF name, got ${kind(grads)}`);
    for (const [name, g] of Object.entries(grads)) {
      const n = numel.get(name);
      if (n === undefined) throw new ArgumentError(`llamaCreate: grads has '${name}', not a tensor of this config`);
      f32(`llamaCreate: grads['${name}']`, g, n, 'numel');
    }
  }
  const raw = sync(() => native().llamaCreate(config, weights, grads ?? null));
  return new CheckedLlama(raw, config.vocabSize);
}

/**
 * Maps a file read-only into memory (munmap when disposed or collected and no model uses it).
 * Use with safetensors TensorInfo.byteOffset to pass weights without reading them into JS.
 * @throws ArgumentError when the file cannot be opened or mapped (the message names it).
 */
export function mapFile(path: string): NativeMappedFile {
  if (typeof path !== 'string' || path.length === 0) throw new ArgumentError(`mapFile: path must be a non-empty string, got ${String(path)}`);
  return sync(() => native().mapFile(path));
}
