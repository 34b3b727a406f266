/**
 * Named model sizes for `bts pretrain --config <name>` and the benchmarks. Each is a Llama config
 * (pre-norm RMSNorm, RoPE, SwiGLU, untied head unless noted) parsed through parseLlamaConfig, so it
 * is exactly what a config.json with these fields gives.
 *
 * | name  | D   | L | H | Hkv | F    | use                                              |
 * |-------|-----|---|---|-----|------|--------------------------------------------------|
 * | tiny  | 64  | 2 | 4 | 2   | 176  | tests, CI                                        |
 * | small | 192 | 4 | 6 | 2   | 512  | the default of `bts pretrain`                    |
 * | a     | 256 | 6 | 8 | 8   | 688  | benchmark config (a) of issue 3 (6.8 M at V=4096) |
 * | b     | 512 | 8 | 8 | 8   | 1376 | benchmark config (b) of issue 3 (34 M at V=8192)  |
 */
import { ArgumentError } from '../errors.js';
import { parseLlamaConfig, type LlamaConfig } from '../formats/hf-config.js';

const PRESETS: Record<string, { D: number; L: number; H: number; Hkv: number; F: number; ctx: number }> = {
  tiny: { D: 64, L: 2, H: 4, Hkv: 2, F: 176, ctx: 512 },
  small: { D: 192, L: 4, H: 6, Hkv: 2, F: 512, ctx: 1024 },
  a: { D: 256, L: 6, H: 8, Hkv: 8, F: 688, ctx: 1024 },
  b: { D: 512, L: 8, H: 8, Hkv: 8, F: 1376, ctx: 2048 },
};

/** Names of the presets. */
export const PRESET_NAMES = Object.keys(PRESETS);

/** Options of {@link llamaPreset}. */
export interface PresetOptions {
  /** Vocabulary size (the tokenizer's). */
  vocabSize: number;
  /** BOS / EOS ids to record in the config (from the tokenizer). */
  bosTokenId?: number | null;
  eosTokenId?: number | null;
  /** Context length; default per preset (512 / 1024 / 1024 / 2048). */
  maxPositionEmbeddings?: number;
  /** RoPE theta. Default 10000. */
  ropeTheta?: number;
  /** Tie the LM head to the embedding. Default false. */
  tieWordEmbeddings?: boolean;
}

/** The HF config.json object of a preset. */
export function presetConfigJson(name: string, o: PresetOptions): Record<string, unknown> {
  const p = PRESETS[name];
  if (!p) throw new ArgumentError(`unknown model preset '${name}'; known: ${PRESET_NAMES.join(', ')} (or give a config.json path)`);
  return {
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    vocab_size: o.vocabSize,
    hidden_size: p.D,
    intermediate_size: p.F,
    num_hidden_layers: p.L,
    num_attention_heads: p.H,
    num_key_value_heads: p.Hkv,
    head_dim: p.D / p.H,
    hidden_act: 'silu',
    max_position_embeddings: o.maxPositionEmbeddings ?? p.ctx,
    rms_norm_eps: 1e-5,
    rope_theta: o.ropeTheta ?? 10000,
    tie_word_embeddings: o.tieWordEmbeddings ?? false,
    bos_token_id: o.bosTokenId ?? null,
    eos_token_id: o.eosTokenId ?? null,
    torch_dtype: 'float32',
  };
}

/** The LlamaConfig of a preset. */
export function llamaPreset(name: string, o: PresetOptions): LlamaConfig {
  return parseLlamaConfig(presetConfigJson(name, o), `preset '${name}'`);
}
