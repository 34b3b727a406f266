/**
 * The typed low-level face of the native stitched model (native/engine/stitched.h, binding
 * native/binding/stitched.cc): a frozen hub and n frozen experts (Llama checkpoints of one
 * architecture) joined by K trainable stitch layers (../shared/METHOD.md, docs/FORMAT.md). The
 * interfaces of what the addon returns, and thin wrappers that check arguments in TypeScript (types,
 * lengths, names, the spec) before the native call and turn native error codes into the typed errors
 * of lib/errors.ts. Models, training loops, generation and the stitch file format live above this.
 *
 * Layout: stitch k (0-based, placement order) holds `stitch.{k}.proj.{e}.weight` [D, D] for each
 * expert e (model e+1) and `stitch.{k}.gate.weight` [D*(n+1), D] (row d*(n+1) + m = model m's logit
 * at dim d; model 0 is the hub); see lib/stitch/layout.ts. Legend: B batch, T tokens per row,
 * N = B*T, V vocab, D hidden, n experts, K stitches, S cache slots.
 *
 * Semantics the native side fixes (stitched.h): training (`forwardBackward`) computes the next-token
 * loss on the hub's output and ACCUMULATES the gradients of the stitch tensors only; frozen blocks
 * run input gradients only; blocks before the first trained stitch run forward-only. Gate dropout (a
 * spec option, training only) zeroes each learned gate logit with probability `gateDropout` before the
 * hub bias and the softmax / sigmoid, without rescaling, from a hash of (seed, stitch, row, column):
 * the same seed gives the same mask. Decoding runs every model on every token, each with its own KV
 * cache inside one {@link NativeStitchedCache}.
 *
 * Known limits: model weights must be Float32Array or Uint16Array (bf16 bits); mapped weights from
 * `mapFile` are refused (UnsupportedFeatureError) until the binding shares the engine's mapping code.
 */
import { ArgumentError, DTypeError, ShapeError, UnsupportedFeatureError, fromNative } from '../errors.js';
import { llamaTensorNames, type LlamaConfig } from '../formats/hf-config.js';
import { native } from '../native.js';
import { checkStitchPlacement, stitchTensorNames, type StitchSpec } from '../stitch/layout.js';
import type { NativeKvCache, NativeLlamaConfig, NativeLossSum, NativeWeight } from './native.js';

/** What an expert's stream becomes after an E->H stitch: its projection p_e (paper) or unchanged h_e. */
export type NativeExpertStream = 'projected' | 'unchanged';

/** The stitches and their options (docs/FORMAT.md, stitch.json). */
export interface NativeStitchSpec {
  /** K >= 1 stitches, `afterBlock` (1-based, 1..L) strictly increasing; any mix of 'eh' / 'he'. */
  stitches: StitchSpec[];
  /** Expert stream after an E->H stitch (default of the package: 'projected'). */
  expertStream: NativeExpertStream;
  /** Fixed logit offset: + on the hub slot of E->H gates, - on the expert slots of H->E gates (0 = none). */
  hubBias: number;
  /** Probability in [0, 1) of zeroing each learned gate logit in training (0 = off). */
  gateDropout: number;
}

/** The KV caches of a stitched model: one per model (hub and experts), advanced together. */
export type NativeStitchedCache = NativeKvCache;

/** A stitched model in the native engine (from {@link stitchedCreate}). */
export interface NativeStitched {
  /**
   * Training step: forward, next-token loss of the hub's output on inputs [B*T] against targets
   * [B*T] (-100 = ignored), and backward to the stitch tensors: the gradient of gradScale * lossSum
   * is ACCUMULATED into the grads given to stitchedCreate. `seed` (integer in [0, 2^53)) seeds the gate
   * dropout. Rejects with ArgumentError when the stitches are frozen (no grads).
   */
  forwardBackward(inputs: Int32Array, targets: Int32Array, B: number, T: number, gradScale: number, seed: number): Promise<NativeLossSum>;
  /** Forward only; `losses` [B*T] (optional) receives per-position losses (0 where ignored). No dropout. */
  loss(inputs: Int32Array, targets: Int32Array, B: number, T: number, losses: Float32Array | null): Promise<NativeLossSum>;
  /** Full forward without cache: out [B*T*V] the hub's logits. */
  logits(tokens: Int32Array, B: number, T: number, out: Float32Array): Promise<void>;
  /** KV caches (one per model) of `slots` sequences of up to `capacity` (<= maxPositionEmbeddings) tokens. */
  createCache(slots: number, capacity: number): NativeStitchedCache;
  /** Appends tokens [T >= 1] to `slot` of every model; out [V] (or longer: the first V) gets the last token's logits. */
  prefill(cache: NativeStitchedCache, slot: number, tokens: Int32Array, out: Float32Array): Promise<void>;
  /** Appends tokens[i] to slots[i] (distinct slots) in one step; out [R*V] (or longer), row i for slots[i]. */
  decode(cache: NativeStitchedCache, slots: Int32Array, tokens: Int32Array, out: Float32Array): Promise<void>;
  /**
   * Gate record of one sequence tokens [T] (positions 0..T-1): out [K*T*(n+1)], for stitch k, token t
   * and model m at `(k*T + t)*(n+1) + m`, the mean over the D dims of the gate. E->H: the softmax
   * weight of model m (sums to 1 over m). H->E: the sigmoid gate of expert m-1 for m >= 1, and 0 at
   * m = 0 (the hub passes an H->E stitch unchanged). Hub bias included, no dropout.
   */
  gates(tokens: Int32Array, out: Float32Array): Promise<void>;
  /** Bytes of workspaces currently allocated. */
  workspaceBytes(): number;
  /** Frees workspaces and releases the arrays (after pending calls settle). Idempotent. */
  dispose(): void;
}

/** Options of {@link stitchedCreate}. */
export interface StitchedCreateOptions {
  /**
   * The experts' own configs, when known: each must equal `config` in every field the engine reads
   * (ArgumentError naming the expert and the first differing field).
   */
  expertConfigs?: NativeLlamaConfig[];
}

// ---------------------------------------------------------------------------------------------------
// Checks

const ENGINE_FIELDS = [
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

function kind(v: unknown): string {
  if (v === null) return 'null';
  if (v === undefined) return 'undefined';
  return (v as object).constructor?.name ?? typeof v;
}

function posInt(where: string, v: unknown): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1) throw new ArgumentError(`${where} must be a positive integer, got ${String(v)}`);
  return v;
}

function nonNegInt(where: string, v: unknown): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw new ArgumentError(`${where} must be a non-negative integer, got ${String(v)}`);
  return v;
}

function i32(where: string, a: unknown, len?: number, shape?: string): Int32Array {
  if (!(a instanceof Int32Array)) throw new DTypeError(`${where} must be an Int32Array, got ${kind(a)}`);
  if (len !== undefined && a.length !== len) throw new ShapeError(`${where} has ${a.length} elements, expected ${shape} = ${len}`);
  return a;
}

function f32(where: string, a: unknown, len?: number, shape?: string, atLeast = false): Float32Array {
  if (!(a instanceof Float32Array)) throw new DTypeError(`${where} must be a Float32Array, got ${kind(a)}`);
  if (len !== undefined && (atLeast ? a.length < len : a.length !== len))
    throw new ShapeError(`${where} has ${a.length} elements, expected ${atLeast ? 'at least ' : ''}${shape} = ${len}`);
  return a;
}

/**
 * Checks that every expert config equals the hub's in each field the engine reads (sizes, norm
 * epsilon, RoPE, context length, tied embeddings). Throws ArgumentError naming the first mismatch:
 * expert index (and name when given), field, both values.
 */
export function checkExpertConfigs(hub: NativeLlamaConfig, experts: readonly NativeLlamaConfig[], names?: readonly string[]): void {
  experts.forEach((e, i) => {
    if (typeof e !== 'object' || e === null) throw new ArgumentError(`stitchedCreate: expertConfigs[${i}] must be a config object, got ${kind(e)}`);
    for (const f of ENGINE_FIELDS) {
      const a = JSON.stringify(e[f] ?? null);
      const b = JSON.stringify(hub[f] ?? null);
      if (a !== b) {
        const who = names?.[i] ? `expert ${i} (${names[i]})` : `expert ${i}`;
        throw new ArgumentError(`stitchedCreate: ${who} has ${f} ${a}, the hub ${b}: all models of a stitched model must share one architecture`);
      }
    }
  });
}

function checkSpec(spec: NativeStitchSpec, L: number): void {
  if (typeof spec !== 'object' || spec === null) throw new ArgumentError(`stitchedCreate: spec must be an object, got ${kind(spec)}`);
  checkStitchPlacement(spec.stitches, L, 'stitchedCreate: spec');
  if (spec.expertStream !== 'projected' && spec.expertStream !== 'unchanged')
    throw new ArgumentError(`stitchedCreate: spec.expertStream must be 'projected' or 'unchanged', got ${JSON.stringify(spec.expertStream)}`);
  if (typeof spec.hubBias !== 'number' || !Number.isFinite(spec.hubBias)) throw new ArgumentError(`stitchedCreate: spec.hubBias must be a finite number, got ${String(spec.hubBias)}`);
  if (typeof spec.gateDropout !== 'number' || !(spec.gateDropout >= 0 && spec.gateDropout < 1))
    throw new ArgumentError(`stitchedCreate: spec.gateDropout must be a number in [0, 1), got ${String(spec.gateDropout)}`);
}

function checkModel(who: string, weights: Record<string, NativeWeight>, numel: Map<string, number>, tie: boolean): void {
  if (typeof weights !== 'object' || weights === null || ArrayBuffer.isView(weights) || Array.isArray(weights))
    throw new ArgumentError(`stitchedCreate: ${who} must be an object of tensors by HF name, got ${kind(weights)}`);
  for (const name of Object.keys(weights))
    if (!numel.has(name))
      throw new ArgumentError(
        `stitchedCreate: ${who} has '${name}', not a tensor of this config${tie && name === 'lm_head.weight' ? ' (tieWordEmbeddings: the LM head is model.embed_tokens.weight)' : ''}`,
      );
  for (const [name, n] of numel) {
    const w = weights[name];
    const where = `stitchedCreate: ${who}['${name}']`;
    if (w === undefined || w === null) throw new ArgumentError(`stitchedCreate: ${who}: weight '${name}' is missing`);
    if (w instanceof Float32Array || w instanceof Uint16Array) {
      if (w.length !== n) throw new ShapeError(`${where} has ${w.length} elements, expected numel = ${n}`);
    } else if (typeof w === 'object' && !ArrayBuffer.isView(w) && 'file' in w) {
      throw new UnsupportedFeatureError(`${where}: mapped weights are not supported by the stitched model yet; pass a Float32Array or a Uint16Array (bf16)`);
    } else {
      throw new DTypeError(`${where} must be a Float32Array or a Uint16Array (bf16), got ${kind(w)}`);
    }
  }
}

async function call<R>(fn: () => Promise<R>): Promise<R> {
  try {
    return await fn();
  } catch (e) {
    throw fromNative(e);
  }
}

function sync<R>(fn: () => R): R {
  try {
    return fn();
  } catch (e) {
    throw fromNative(e);
  }
}

// ---------------------------------------------------------------------------------------------------
// Wrappers

class CheckedStitchedCache implements NativeStitchedCache, Disposable {
  constructor(readonly raw: NativeStitchedCache) {}
  length(slot: number): number {
    return sync(() => this.raw.length(nonNegInt('NativeStitchedCache.length: slot', slot)));
  }
  reset(slot: number): void {
    sync(() => this.raw.reset(nonNegInt('NativeStitchedCache.reset: slot', slot)));
  }
  truncate(slot: number, length: number): void {
    sync(() => this.raw.truncate(nonNegInt('NativeStitchedCache.truncate: slot', slot), nonNegInt('NativeStitchedCache.truncate: length', length)));
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

function rawCache(where: string, c: unknown): NativeStitchedCache {
  if (c instanceof CheckedStitchedCache) return c.raw;
  if (typeof c !== 'object' || c === null) throw new ArgumentError(`${where}: cache must be a stitched model's cache (from createCache), got ${kind(c)}`);
  return c as NativeStitchedCache;
}

class CheckedStitched implements NativeStitched, Disposable {
  constructor(
    private readonly raw: NativeStitched,
    private readonly V: number,
    private readonly K: number,
    private readonly M: number,
  ) {}

  forwardBackward(inputs: Int32Array, targets: Int32Array, B: number, T: number, gradScale: number, seed = 0): Promise<NativeLossSum> {
    return call(async () => {
      const w = 'NativeStitched.forwardBackward';
      const N = posInt(`${w}: B`, B) * posInt(`${w}: T`, T);
      i32(`${w}: inputs`, inputs, N, 'B*T');
      i32(`${w}: targets`, targets, N, 'B*T');
      if (typeof gradScale !== 'number' || !Number.isFinite(gradScale)) throw new ArgumentError(`${w}: gradScale must be a finite number, got ${String(gradScale)}`);
      nonNegInt(`${w}: seed`, seed);
      return this.raw.forwardBackward(inputs, targets, B, T, gradScale, seed);
    });
  }

  loss(inputs: Int32Array, targets: Int32Array, B: number, T: number, losses: Float32Array | null = null): Promise<NativeLossSum> {
    return call(async () => {
      const N = posInt('NativeStitched.loss: B', B) * posInt('NativeStitched.loss: T', T);
      i32('NativeStitched.loss: inputs', inputs, N, 'B*T');
      i32('NativeStitched.loss: targets', targets, N, 'B*T');
      if (losses !== null && losses !== undefined) f32('NativeStitched.loss: losses', losses, N, 'B*T');
      return this.raw.loss(inputs, targets, B, T, losses ?? null);
    });
  }

  logits(tokens: Int32Array, B: number, T: number, out: Float32Array): Promise<void> {
    return call(async () => {
      const N = posInt('NativeStitched.logits: B', B) * posInt('NativeStitched.logits: T', T);
      i32('NativeStitched.logits: tokens', tokens, N, 'B*T');
      f32('NativeStitched.logits: out', out, N * this.V, 'B*T*V');
      return this.raw.logits(tokens, B, T, out);
    });
  }

  createCache(slots: number, capacity: number): NativeStitchedCache {
    posInt('NativeStitched.createCache: slots', slots);
    posInt('NativeStitched.createCache: capacity', capacity);
    return new CheckedStitchedCache(sync(() => this.raw.createCache(slots, capacity)));
  }

  prefill(cache: NativeStitchedCache, slot: number, tokens: Int32Array, out: Float32Array): Promise<void> {
    return call(async () => {
      const c = rawCache('NativeStitched.prefill', cache);
      nonNegInt('NativeStitched.prefill: slot', slot);
      i32('NativeStitched.prefill: tokens', tokens);
      if (tokens.length < 1) throw new ShapeError('NativeStitched.prefill: tokens must hold at least one id');
      f32('NativeStitched.prefill: out', out, this.V, 'V', true);
      return this.raw.prefill(c, slot, tokens, out);
    });
  }

  decode(cache: NativeStitchedCache, slots: Int32Array, tokens: Int32Array, out: Float32Array): Promise<void> {
    return call(async () => {
      const c = rawCache('NativeStitched.decode', cache);
      i32('NativeStitched.decode: slots', slots);
      if (slots.length < 1) throw new ShapeError('NativeStitched.decode: slots must hold at least one slot');
      i32('NativeStitched.decode: tokens', tokens, slots.length, 'slots.length');
      f32('NativeStitched.decode: out', out, slots.length * this.V, 'slots.length*V', true);
      return this.raw.decode(c, slots, tokens, out);
    });
  }

  gates(tokens: Int32Array, out: Float32Array): Promise<void> {
    return call(async () => {
      i32('NativeStitched.gates: tokens', tokens);
      if (tokens.length < 1) throw new ShapeError('NativeStitched.gates: tokens must hold at least one id');
      f32('NativeStitched.gates: out', out, this.K * tokens.length * this.M, 'K*T*(n+1)');
      return this.raw.gates(tokens, out);
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

/**
 * Creates a stitched model in the native engine over the given arrays (no copy; the engine reads
 * their current values at every call, so in-place optimizer updates of the stitch tensors are seen).
 * Checks everything before the native call.
 * @param config the architecture shared by the hub and every expert (a LlamaConfig works as is).
 * @param hub every tensor of `llamaTensorNames(config)` by HF name: Float32Array or Uint16Array (bf16).
 *   Frozen. Norm weights may be bf16 (widened once).
 * @param experts n >= 1 weight records of the same form, in expert order (expert e is model e+1).
 * @param spec placement and options; see {@link NativeStitchSpec}.
 * @param weights every stitch tensor of `stitchTensorNames(D, n, spec.stitches)` as a Float32Array.
 * @param grads null for frozen stitches, or Float32Arrays by stitch tensor name (a subset: missing
 *   names are frozen). Gradients accumulate (+=); zero them between optimizer steps.
 * @param options `expertConfigs` to check against `config` (see {@link checkExpertConfigs}).
 * @throws ArgumentError, DTypeError, ShapeError naming the tensor or field; UnsupportedFeatureError for
 *   mapped weights or RoPE scaling other than llama3.
 */
export function stitchedCreate(
  config: NativeLlamaConfig,
  hub: Record<string, NativeWeight>,
  experts: Record<string, NativeWeight>[],
  spec: NativeStitchSpec,
  weights: Record<string, Float32Array>,
  grads: Record<string, Float32Array> | null,
  options: StitchedCreateOptions = {},
): NativeStitched {
  if (typeof config !== 'object' || config === null) throw new ArgumentError(`stitchedCreate: config must be an object, got ${kind(config)}`);
  for (const k of ['vocabSize', 'hiddenSize', 'intermediateSize', 'numHiddenLayers', 'numAttentionHeads', 'numKeyValueHeads', 'headDim', 'maxPositionEmbeddings'] as const)
    posInt(`stitchedCreate: config.${k}`, config[k]);
  if (typeof config.tieWordEmbeddings !== 'boolean')
    throw new ArgumentError(`stitchedCreate: config.tieWordEmbeddings must be a boolean, got ${String(config.tieWordEmbeddings)}`);
  if (!Array.isArray(experts) || experts.length < 1) throw new ArgumentError(`stitchedCreate: experts must be a non-empty array of weight records, got ${kind(experts)}`);
  if (options.expertConfigs !== undefined) {
    if (!Array.isArray(options.expertConfigs) || options.expertConfigs.length !== experts.length)
      throw new ArgumentError(`stitchedCreate: options.expertConfigs must hold one config per expert (${experts.length})`);
    checkExpertConfigs(config, options.expertConfigs);
  }
  checkSpec(spec, config.numHiddenLayers);
  const specs = llamaTensorNames(config as LlamaConfig);
  const numel = new Map(specs.map((s) => [s.name, s.shape.reduce((a, b) => a * b, 1)]));
  checkModel('hub', hub, numel, config.tieWordEmbeddings);
  experts.forEach((e, i) => checkModel(`experts[${i}]`, e, numel, config.tieWordEmbeddings));

  const n = experts.length;
  const stitchNumel = new Map(stitchTensorNames(config.hiddenSize, n, spec.stitches).map((t) => [t.name, t.shape[0] * t.shape[1]]));
  const describeSet = `stitch tensors of ${spec.stitches.length} stitches and ${n} experts`;
  if (typeof weights !== 'object' || weights === null) throw new ArgumentError(`stitchedCreate: weights must be an object by stitch tensor name, got ${kind(weights)}`);
  for (const name of Object.keys(weights)) if (!stitchNumel.has(name)) throw new ArgumentError(`stitchedCreate: weights has '${name}', not one of the ${describeSet}`);
  for (const [name, len] of stitchNumel) {
    if (weights[name] === undefined || weights[name] === null) throw new ArgumentError(`stitchedCreate: stitch tensor '${name}' is missing`);
    f32(`stitchedCreate: weights['${name}']`, weights[name], len, 'numel');
  }
  if (grads !== null && grads !== undefined) {
    if (typeof grads !== 'object') throw new ArgumentError(`stitchedCreate: grads must be null or an object by stitch tensor name, got ${kind(grads)}`);
    for (const [name, g] of Object.entries(grads)) {
      const len = stitchNumel.get(name);
      if (len === undefined) throw new ArgumentError(`stitchedCreate: grads has '${name}', not one of the ${describeSet}`);
      f32(`stitchedCreate: grads['${name}']`, g, len, 'numel');
    }
  }
  const raw = sync(() => native().stitchedCreate(config, hub, experts, spec, weights, grads ?? null));
  return new CheckedStitched(raw, config.vocabSize, spec.stitches.length, n + 1);
}
