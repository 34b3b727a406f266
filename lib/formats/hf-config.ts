/**
 * Hugging Face Llama `config.json` / `generation_config.json` (conventions: /work/shared/PACKAGING.md
 * 6.3, after transformers `configuration_llama.py`).
 *
 * `parseLlamaConfig` turns the snake_case JSON into a validated camelCase {@link LlamaConfig} with
 * the transformers defaults filled in; `toHfConfigJson` goes back to a file transformers reads;
 * `llamaTensorNames` lists the HF weight names and shapes the engine validates safetensors against.
 *
 * Why it is shaped this way: configs in the wild spell RoPE three ways (`rope_scaling.rope_type`,
 * legacy `rope_scaling.type`, and the newer `rope_parameters` holding `rope_theta` and `rope_type`),
 * give `eos_token_id` as an int or a list, and omit `head_dim` / `num_key_value_heads`. All are
 * accepted; anything this package cannot run (attention/MLP biases, non-SiLU activations, dynamic
 * or YaRN RoPE) is refused with an {@link UnsupportedFeatureError} instead of loading a model that
 * would compute something else.
 *
 * Layout (HF `nn.Linear` stores [out, in]; y = x Wᵀ). Legend: V vocab, D hidden, F intermediate,
 * H heads, Hkv key/value heads, Dh head dim, L layers.
 */
import * as fs from 'node:fs';
import { FormatError, UnsupportedFeatureError } from '../errors.js';
import { writeFileAtomic } from './atomic.js';

/** RoPE frequency scaling. */
export type RopeScaling =
  | {
      /** Llama 3.1+ piecewise scaling of the inverse frequencies. */
      type: 'llama3';
      factor: number;
      lowFreqFactor: number;
      highFreqFactor: number;
      /** Context length the base model was trained at, in tokens. */
      originalMaxPositionEmbeddings: number;
    }
  | {
      /** Position interpolation: positions divided by `factor`. */
      type: 'linear';
      factor: number;
    };

/** A validated Llama configuration. */
export interface LlamaConfig {
  /** V: number of token embeddings. */
  vocabSize: number;
  /** D: model width. */
  hiddenSize: number;
  /** F: SwiGLU inner width. */
  intermediateSize: number;
  /** L: decoder layers. */
  numHiddenLayers: number;
  /** H: query heads. */
  numAttentionHeads: number;
  /** Hkv: key/value heads (H % Hkv == 0; < H means grouped-query attention). */
  numKeyValueHeads: number;
  /** Dh: per-head width (default D / H). */
  headDim: number;
  /** RMSNorm epsilon. */
  rmsNormEps: number;
  /** RoPE base θ. */
  ropeTheta: number;
  /** RoPE scaling, or null for plain RoPE. */
  ropeScaling: RopeScaling | null;
  /** Longest context the model is configured for, in tokens. */
  maxPositionEmbeddings: number;
  /** True when lm_head reuses embed_tokens (no `lm_head.weight` tensor). */
  tieWordEmbeddings: boolean;
  /** Beginning-of-sequence id, or null when the config has none. */
  bosTokenId: number | null;
  /** Every end-of-sequence id (the config's int or list; [] when absent). */
  eosTokenIds: number[];
  /** Padding id, or null. */
  padTokenId: number | null;
  /** Stored weight dtype (`torch_dtype`, or `dtype` in newer transformers), e.g. 'bfloat16'; null when absent. */
  torchDtype: string | null;
}

/** transformers' LlamaConfig defaults for fields a config may omit. */
export const LLAMA_DEFAULTS = {
  vocabSize: 32000,
  hiddenSize: 4096,
  intermediateSize: 11008,
  numHiddenLayers: 32,
  numAttentionHeads: 32,
  maxPositionEmbeddings: 2048,
  rmsNormEps: 1e-6,
  ropeTheta: 10000,
  bosTokenId: 1,
  eosTokenId: 2,
  tieWordEmbeddings: false,
} as const;

type Json = Record<string, unknown>;

function ctx(source: string): (what: string) => never {
  return (what: string) => {
    throw new FormatError(`${source}: ${what}`);
  };
}

function readJsonFile(file: string): unknown {
  const text = fs.readFileSync(file, 'utf8');
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new FormatError(`${file}: not valid JSON (${(e as Error).message})`, { cause: e });
  }
}

function asObject(json: unknown, source: string): Json {
  const j = typeof json === 'string' ? (() => {
    try {
      return JSON.parse(json) as unknown;
    } catch (e) {
      throw new FormatError(`${source}: not valid JSON (${(e as Error).message})`, { cause: e });
    }
  })() : json;
  if (typeof j !== 'object' || j === null || Array.isArray(j)) throw new FormatError(`${source}: must be a JSON object`);
  return j as Json;
}

function posInt(fail: (w: string) => never, j: Json, key: string, dflt?: number): number {
  const v = j[key] ?? dflt;
  if (v === undefined) fail(`"${key}" is required`);
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v <= 0) fail(`"${key}" must be a positive integer, got ${JSON.stringify(v)}`);
  return v as number;
}

function posNum(fail: (w: string) => never, v: unknown, key: string): number {
  if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) fail(`"${key}" must be a positive number, got ${JSON.stringify(v)}`);
  return v as number;
}

function tokenId(fail: (w: string) => never, v: unknown, key: string): number | null {
  if (v === null || v === undefined) return null;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) fail(`"${key}" must be a non-negative integer or null, got ${JSON.stringify(v)}`);
  return v as number;
}

function tokenIds(fail: (w: string) => never, v: unknown, key: string): number[] {
  if (v === null || v === undefined) return [];
  if (Array.isArray(v)) return v.map((x, i) => tokenId(fail, x, `${key}[${i}]`) as number).filter((x) => x !== null);
  const one = tokenId(fail, v, key);
  return one === null ? [] : [one];
}

function parseRope(fail: (w: string) => never, r: unknown, key: string, source: string): RopeScaling | null {
  if (r === null || r === undefined) return null;
  if (typeof r !== 'object' || Array.isArray(r)) fail(`"${key}" must be an object or null, got ${JSON.stringify(r)}`);
  const o = r as Json;
  const type = o.rope_type ?? o.type ?? 'default';
  if (type === 'default') return null;
  if (type === 'llama3') {
    const s = {
      type: 'llama3' as const,
      factor: posNum(fail, o.factor, `${key}.factor`),
      lowFreqFactor: posNum(fail, o.low_freq_factor, `${key}.low_freq_factor`),
      highFreqFactor: posNum(fail, o.high_freq_factor, `${key}.high_freq_factor`),
      originalMaxPositionEmbeddings: posInt(fail, o, 'original_max_position_embeddings'),
    };
    if (!(s.highFreqFactor > s.lowFreqFactor)) fail(`${key}: high_freq_factor (${s.highFreqFactor}) must exceed low_freq_factor (${s.lowFreqFactor})`);
    return s;
  }
  if (type === 'linear') return { type: 'linear', factor: posNum(fail, o.factor, `${key}.factor`) };
  throw new UnsupportedFeatureError(`${source}: ${key}: RoPE type ${JSON.stringify(type)} is not supported (supported: default, linear, llama3)`);
}

/**
 * Parses and validates a Llama `config.json`.
 * @param json the parsed object, or the JSON text.
 * @param source name used in error messages (e.g. the file path). Default 'config.json'.
 * @throws FormatError for malformed or inconsistent fields (naming the field, expected and actual
 *   value); UnsupportedFeatureError for other architectures, biases or activations this package
 *   does not implement.
 */
export function parseLlamaConfig(json: unknown, source = 'config.json'): LlamaConfig {
  const j = asObject(json, source);
  const fail = ctx(source);
  const arch = Array.isArray(j.architectures) ? (j.architectures as unknown[]) : [];
  if (j.model_type !== 'llama' && !arch.includes('LlamaForCausalLM')) {
    throw new UnsupportedFeatureError(
      `${source}: not a Llama config (model_type ${JSON.stringify(j.model_type)}, architectures ${JSON.stringify(j.architectures)}); expected model_type "llama" or architectures ["LlamaForCausalLM"]`,
    );
  }
  if (j.attention_bias === true) throw new UnsupportedFeatureError(`${source}: attention_bias = true is not supported (q/k/v/o projections without bias only)`);
  if (j.mlp_bias === true) throw new UnsupportedFeatureError(`${source}: mlp_bias = true is not supported (gate/up/down projections without bias only)`);
  const act = j.hidden_act ?? 'silu';
  if (act !== 'silu') throw new UnsupportedFeatureError(`${source}: hidden_act ${JSON.stringify(act)} is not supported (only "silu")`);

  const D = LLAMA_DEFAULTS;
  const hiddenSize = posInt(fail, j, 'hidden_size', D.hiddenSize);
  const numAttentionHeads = posInt(fail, j, 'num_attention_heads', D.numAttentionHeads);
  const numKeyValueHeads = j.num_key_value_heads == null ? numAttentionHeads : posInt(fail, j, 'num_key_value_heads');
  if (numAttentionHeads % numKeyValueHeads !== 0) {
    fail(`num_attention_heads (${numAttentionHeads}) must be a multiple of num_key_value_heads (${numKeyValueHeads})`);
  }
  let headDim: number;
  if (j.head_dim == null) {
    if (hiddenSize % numAttentionHeads !== 0) fail(`hidden_size (${hiddenSize}) must be divisible by num_attention_heads (${numAttentionHeads}) when head_dim is absent`);
    headDim = hiddenSize / numAttentionHeads;
  } else {
    headDim = posInt(fail, j, 'head_dim');
  }
  if (headDim % 2 !== 0) fail(`head_dim (${headDim}) must be even for RoPE`);

  // RoPE: rope_parameters (newer transformers) wins over rope_theta + rope_scaling.
  let ropeTheta: number;
  let ropeScaling: RopeScaling | null;
  const rp = j.rope_parameters;
  if (rp != null) {
    if (typeof rp !== 'object' || Array.isArray(rp)) fail(`"rope_parameters" must be an object, got ${JSON.stringify(rp)}`);
    const o = rp as Json;
    ropeTheta = posNum(fail, o.rope_theta ?? j.rope_theta ?? D.ropeTheta, 'rope_parameters.rope_theta');
    ropeScaling = parseRope(fail, o, 'rope_parameters', source);
  } else {
    ropeTheta = posNum(fail, j.rope_theta ?? D.ropeTheta, 'rope_theta');
    ropeScaling = parseRope(fail, j.rope_scaling, 'rope_scaling', source);
  }

  const torchDtype = j.torch_dtype ?? j.dtype ?? null;
  if (torchDtype !== null && typeof torchDtype !== 'string') fail(`"torch_dtype" must be a string, got ${JSON.stringify(torchDtype)}`);
  const tie = j.tie_word_embeddings ?? D.tieWordEmbeddings;
  if (typeof tie !== 'boolean') fail(`"tie_word_embeddings" must be a boolean, got ${JSON.stringify(tie)}`);
  const cfg: LlamaConfig = {
    vocabSize: posInt(fail, j, 'vocab_size', D.vocabSize),
    hiddenSize,
    intermediateSize: posInt(fail, j, 'intermediate_size', D.intermediateSize),
    numHiddenLayers: posInt(fail, j, 'num_hidden_layers', D.numHiddenLayers),
    numAttentionHeads,
    numKeyValueHeads,
    headDim,
    rmsNormEps: posNum(fail, j.rms_norm_eps ?? D.rmsNormEps, 'rms_norm_eps'),
    ropeTheta,
    ropeScaling,
    maxPositionEmbeddings: posInt(fail, j, 'max_position_embeddings', D.maxPositionEmbeddings),
    tieWordEmbeddings: tie as boolean,
    bosTokenId: tokenId(fail, 'bos_token_id' in j ? j.bos_token_id : D.bosTokenId, 'bos_token_id'),
    eosTokenIds: tokenIds(fail, 'eos_token_id' in j ? j.eos_token_id : D.eosTokenId, 'eos_token_id'),
    // Some converted checkpoints write pad_token_id: -1 for "none".
    padTokenId: typeof j.pad_token_id === 'number' && j.pad_token_id < 0 ? null : tokenId(fail, j.pad_token_id, 'pad_token_id'),
    torchDtype: torchDtype as string | null,
  };
  const ids: [string, number | null][] = [['bos_token_id', cfg.bosTokenId], ['pad_token_id', cfg.padTokenId], ...cfg.eosTokenIds.map((e, i): [string, number] => [`eos_token_id[${i}]`, e])];
  for (const [k, v] of ids) if (v !== null && v >= cfg.vocabSize) fail(`${k} (${v}) must be < vocab_size (${cfg.vocabSize})`);
  return cfg;
}

/** Reads and parses a `config.json` file (see {@link parseLlamaConfig}). */
export function loadLlamaConfig(file: string): LlamaConfig {
  return parseLlamaConfig(readJsonFile(file), file);
}

/**
 * A `config.json` object transformers' LlamaForCausalLM loads: model_type, architectures,
 * torch_dtype and every field of {@link LlamaConfig} in snake_case, RoPE scaling written as
 * `rope_scaling` with `rope_type` (the spelling transformers 4.43+ and 5 both read).
 * Keys are emitted in sorted order, as transformers' `to_json_string` does.
 */
export function toHfConfigJson(config: LlamaConfig): Record<string, unknown> {
  const rs = config.ropeScaling;
  const o: Record<string, unknown> = {
    architectures: ['LlamaForCausalLM'],
    attention_bias: false,
    attention_dropout: 0,
    bos_token_id: config.bosTokenId,
    eos_token_id: config.eosTokenIds.length === 1 ? config.eosTokenIds[0] : config.eosTokenIds.length === 0 ? null : [...config.eosTokenIds],
    head_dim: config.headDim,
    hidden_act: 'silu',
    hidden_size: config.hiddenSize,
    initializer_range: 0.02,
    intermediate_size: config.intermediateSize,
    max_position_embeddings: config.maxPositionEmbeddings,
    mlp_bias: false,
    model_type: 'llama',
    num_attention_heads: config.numAttentionHeads,
    num_hidden_layers: config.numHiddenLayers,
    num_key_value_heads: config.numKeyValueHeads,
    pad_token_id: config.padTokenId,
    pretraining_tp: 1,
    rms_norm_eps: config.rmsNormEps,
    rope_scaling:
      rs === null
        ? null
        : rs.type === 'llama3'
          ? {
              factor: rs.factor,
              high_freq_factor: rs.highFreqFactor,
              low_freq_factor: rs.lowFreqFactor,
              original_max_position_embeddings: rs.originalMaxPositionEmbeddings,
              rope_type: 'llama3',
            }
          : { factor: rs.factor, rope_type: 'linear', type: 'linear' },
    rope_theta: config.ropeTheta,
    tie_word_embeddings: config.tieWordEmbeddings,
    torch_dtype: config.torchDtype ?? 'float32',
    use_cache: true,
    vocab_size: config.vocabSize,
  };
  return o;
}

/** Writes `config.json` atomically (2-space indented, trailing newline). */
export function writeLlamaConfig(file: string, config: LlamaConfig): void {
  writeFileAtomic(file, JSON.stringify(toHfConfigJson(config), null, 2) + '\n');
}

/** The fields of `generation_config.json` the engine uses. */
export interface GenerationConfig {
  /** Beginning-of-sequence id, or null. */
  bosTokenId: number | null;
  /** Every stop token id (`eos_token_id` int or list; [] when absent). */
  eosTokenIds: number[];
  /** Padding id, or null. */
  padTokenId: number | null;
  /** Sampling on/off, or null when unspecified. */
  doSample: boolean | null;
  /** Softmax temperature, or null. */
  temperature: number | null;
  /** Nucleus probability mass, or null. */
  topP: number | null;
  /** Top-k cutoff, or null. */
  topK: number | null;
  /** Total length limit in tokens, or null. */
  maxLength: number | null;
  /** New-token limit, or null. */
  maxNewTokens: number | null;
}

/**
 * Parses `generation_config.json` (a parsed object or JSON text). Every field is optional; wrong
 * types are a FormatError naming the field.
 */
export function readGenerationConfig(json: unknown, source = 'generation_config.json'): GenerationConfig {
  const j = asObject(json, source);
  const fail = ctx(source);
  const num = (k: string, int: boolean): number | null => {
    const v = j[k];
    if (v == null) return null;
    if (typeof v !== 'number' || !Number.isFinite(v) || v < 0 || (int && !Number.isSafeInteger(v))) fail(`"${k}" must be a non-negative ${int ? 'integer' : 'number'}, got ${JSON.stringify(v)}`);
    return v as number;
  };
  const ds = j.do_sample;
  if (ds != null && typeof ds !== 'boolean') fail(`"do_sample" must be a boolean, got ${JSON.stringify(ds)}`);
  return {
    bosTokenId: tokenId(fail, j.bos_token_id, 'bos_token_id'),
    eosTokenIds: tokenIds(fail, j.eos_token_id, 'eos_token_id'),
    padTokenId: tokenId(fail, j.pad_token_id, 'pad_token_id'),
    doSample: (ds as boolean | undefined) ?? null,
    temperature: num('temperature', false),
    topP: num('top_p', false),
    topK: num('top_k', true),
    maxLength: num('max_length', true),
    maxNewTokens: num('max_new_tokens', true),
  };
}

/** Reads and parses a `generation_config.json` file. */
export function loadGenerationConfig(file: string): GenerationConfig {
  return readGenerationConfig(readJsonFile(file), file);
}

/** One expected weight of a Llama checkpoint. */
export interface LlamaTensorSpec {
  /** HF safetensors name, e.g. `model.layers.0.self_attn.q_proj.weight`. */
  name: string;
  /** Shape in HF layout ([out, in] for Linear weights). */
  shape: number[];
}

/**
 * Every weight of a LlamaForCausalLM checkpoint with its shape, in a stable order (embedding, then
 * per layer: input_layernorm, q/k/v/o, post_attention_layernorm, gate/up/down, then norm, lm_head).
 * `lm_head.weight` is absent when `tieWordEmbeddings`.
 */
export function llamaTensorNames(config: LlamaConfig): LlamaTensorSpec[] {
  const { vocabSize: V, hiddenSize: D, intermediateSize: F, numAttentionHeads: H, numKeyValueHeads: Hkv, headDim: Dh } = config;
  const out: LlamaTensorSpec[] = [{ name: 'model.embed_tokens.weight', shape: [V, D] }];
  for (let i = 0; i < config.numHiddenLayers; i++) {
    const p = `model.layers.${i}`;
    out.push(
      { name: `${p}.input_layernorm.weight`, shape: [D] },
      { name: `${p}.self_attn.q_proj.weight`, shape: [H * Dh, D] },
      { name: `${p}.self_attn.k_proj.weight`, shape: [Hkv * Dh, D] },
      { name: `${p}.self_attn.v_proj.weight`, shape: [Hkv * Dh, D] },
      { name: `${p}.self_attn.o_proj.weight`, shape: [D, H * Dh] },
      { name: `${p}.post_attention_layernorm.weight`, shape: [D] },
      { name: `${p}.mlp.gate_proj.weight`, shape: [F, D] },
      { name: `${p}.mlp.up_proj.weight`, shape: [F, D] },
      { name: `${p}.mlp.down_proj.weight`, shape: [D, F] },
    );
  }
  out.push({ name: 'model.norm.weight', shape: [D] });
  if (!config.tieWordEmbeddings) out.push({ name: 'lm_head.weight', shape: [V, D] });
  return out;
}
