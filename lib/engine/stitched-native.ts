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
 * Hub and expert weights are taken as llamaCreate takes a model's (Float32Array, Uint16Array of bf16
 * bits, or mapped tensors {file, offset, dtype, length} from `mapFile`, which the model keeps mapped
 * until dispose()); the argument checkers and the checked KV cache are those of lib/engine/native.ts.
 *
 * Known limits: stitch tensors and their gradients must be Float32Arrays (they train in place).
 */
import { ArgumentError, ShapeError } from '../errors.js';
import { native } from '../native.js';
import { checkStitchPlacement, stitchTensorNames, type StitchSpec } from '../stitch/layout.js';
import {
  CheckedModel,
  call,
  checkConfig,
  checkModelWeights,
  configDifference,
  f32,
  i32,
  kind,
  nonNegInt,
  posInt,
  sync,
  tensorNumel,
  type NativeKvCache,
  type NativeLlamaConfig,
  type NativeLossSum,
  type NativeWeight,
} from './native.js';

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

/**
 * Checks that every expert config equals the hub's in each field the engine reads (sizes, norm
 * epsilon, RoPE, context length, tied embeddings). Throws ArgumentError naming the first mismatch:
 * expert index (and name when given), field, both values.
 */
export function checkExpertConfigs(hub: NativeLlamaConfig, experts: readonly NativeLlamaConfig[], names?: readonly string[]): void {
  experts.forEach((e, i) => {
    if (typeof e !== 'object' || e === null) throw new ArgumentError(`stitchedCreate: expertConfigs[${i}] must be a config object, got ${kind(e)}`);
    const d = configDifference(hub, e);
    if (d) {
      const who = names?.[i] ? `expert ${i} (${names[i]})` : `expert ${i}`;
      throw new ArgumentError(`stitchedCreate: ${who} has ${d.field} ${d.b}, the hub ${d.a}: all models of a stitched model must share one architecture`);
    }
  });
}

/** Checks a stitch spec over L blocks (placement and options); ArgumentError naming the field. @internal */
export function checkSpec(spec: NativeStitchSpec, L: number): void {
  if (typeof spec !== 'object' || spec === null) throw new ArgumentError(`stitchedCreate: spec must be an object, got ${kind(spec)}`);
  checkStitchPlacement(spec.stitches, L, 'stitchedCreate: spec');
  if (spec.expertStream !== 'projected' && spec.expertStream !== 'unchanged')
    throw new ArgumentError(`stitchedCreate: spec.expertStream must be 'projected' or 'unchanged', got ${JSON.stringify(spec.expertStream)}`);
  if (typeof spec.hubBias !== 'number' || !Number.isFinite(spec.hubBias)) throw new ArgumentError(`stitchedCreate: spec.hubBias must be a finite number, got ${String(spec.hubBias)}`);
  if (typeof spec.gateDropout !== 'number' || !(spec.gateDropout >= 0 && spec.gateDropout < 1))
    throw new ArgumentError(`stitchedCreate: spec.gateDropout must be a number in [0, 1), got ${String(spec.gateDropout)}`);
}

// ---------------------------------------------------------------------------------------------------
// Wrapper

class CheckedStitched extends CheckedModel<NativeStitched> implements NativeStitched {
  constructor(
    raw: NativeStitched,
    V: number,
    private readonly K: number,
    private readonly M: number,
  ) {
    super(raw, V, 'NativeStitched', 'NativeStitchedCache', "a stitched model's cache");
  }

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

  gates(tokens: Int32Array, out: Float32Array): Promise<void> {
    return call(async () => {
      i32('NativeStitched.gates: tokens', tokens);
      if (tokens.length < 1) throw new ShapeError('NativeStitched.gates: tokens must hold at least one id');
      f32('NativeStitched.gates: out', out, this.K * tokens.length * this.M, 'K*T*(n+1)');
      return this.raw.gates(tokens, out);
    });
  }
}

/**
 * Creates a stitched model in the native engine over the given arrays (no copy; the engine reads
 * their current values at every call, so in-place optimizer updates of the stitch tensors are seen).
 * Checks everything before the native call.
 * @param config the architecture shared by the hub and every expert (a LlamaConfig works as is).
 * @param hub every tensor of `llamaTensorNames(config)` by HF name: Float32Array, Uint16Array (bf16)
 *   or a mapped tensor {file, offset, dtype, length} (see `mapFile`). Frozen. Norm weights may be bf16
 *   (widened once).
 * @param experts n >= 1 weight records of the same form, in expert order (expert e is model e+1).
 * @param spec placement and options; see {@link NativeStitchSpec}.
 * @param weights every stitch tensor of `stitchTensorNames(D, n, spec.stitches)` as a Float32Array.
 * @param grads null for frozen stitches, or Float32Arrays by stitch tensor name (a subset: missing
 *   names are frozen). Gradients accumulate (+=); zero them between optimizer steps.
 * @param options `expertConfigs` to check against `config` (see {@link checkExpertConfigs}).
 * @throws ArgumentError, DTypeError, ShapeError naming the tensor or field; UnsupportedFeatureError for
 *   RoPE scaling other than llama3; DisposedError for a disposed mapped file.
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
  checkConfig(config, 'stitchedCreate');
  if (!Array.isArray(experts) || experts.length < 1) throw new ArgumentError(`stitchedCreate: experts must be a non-empty array of weight records, got ${kind(experts)}`);
  if (options.expertConfigs !== undefined) {
    if (!Array.isArray(options.expertConfigs) || options.expertConfigs.length !== experts.length)
      throw new ArgumentError(`stitchedCreate: options.expertConfigs must hold one config per expert (${experts.length})`);
    checkExpertConfigs(config, options.expertConfigs);
  }
  checkSpec(spec, config.numHiddenLayers);
  const numel = tensorNumel(config);
  checkModelWeights('stitchedCreate', 'hub', hub, numel, config.tieWordEmbeddings);
  experts.forEach((e, i) => checkModelWeights('stitchedCreate', `experts[${i}]`, e, numel, config.tieWordEmbeddings));

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
