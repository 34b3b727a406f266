import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { FormatError, UnsupportedFeatureError } from '../../lib/errors.js';
import {
  llamaTensorNames,
  loadGenerationConfig,
  loadLlamaConfig,
  parseLlamaConfig,
  readGenerationConfig,
  toHfConfigJson,
  writeLlamaConfig,
} from '../../lib/formats/hf-config.js';

const fixtures = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'hf');
const fixture = (name: string): Record<string, unknown> => JSON.parse(fs.readFileSync(path.join(fixtures, name), 'utf8'));

describe('parseLlamaConfig on real-world configs', () => {
  it('Llama 2 7B: MHA, no rope scaling, untied, float16', () => {
    const c = loadLlamaConfig(path.join(fixtures, 'llama2-7b.config.json'));
    expect(c).toEqual({
      vocabSize: 32000,
      hiddenSize: 4096,
      intermediateSize: 11008,
      numHiddenLayers: 32,
      numAttentionHeads: 32,
      numKeyValueHeads: 32,
      headDim: 128,
      rmsNormEps: 1e-5,
      ropeTheta: 10000,
      ropeScaling: null,
      maxPositionEmbeddings: 4096,
      tieWordEmbeddings: false,
      bosTokenId: 1,
      eosTokenIds: [2],
      padTokenId: null,
      torchDtype: 'float16',
    });
  });

  it('Llama 3.2 1B: GQA, llama3 rope_scaling, tied embeddings', () => {
    const c = parseLlamaConfig(fixture('llama3.2-1b.config.json'));
    expect(c.numKeyValueHeads).toBe(8);
    expect(c.headDim).toBe(64);
    expect(c.ropeTheta).toBe(500000);
    expect(c.ropeScaling).toEqual({ type: 'llama3', factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 });
    expect(c.tieWordEmbeddings).toBe(true);
    expect(c.eosTokenIds).toEqual([128001]);
    expect(c.torchDtype).toBe('bfloat16');
  });

  it('Llama 3.1 8B Instruct with rope_parameters, dtype and an eos list', () => {
    const c = parseLlamaConfig(fixture('llama3.1-8b-instruct.rope_parameters.config.json'));
    expect(c.ropeTheta).toBe(500000);
    expect(c.ropeScaling).toEqual({ type: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 });
    expect(c.eosTokenIds).toEqual([128001, 128008, 128009]);
    expect(c.torchDtype).toBe('bfloat16');
    expect(c.headDim).toBe(128);
  });

  it('legacy rope_scaling.type and rope_parameters with rope_type default', () => {
    const base = fixture('llama2-7b.config.json');
    expect(parseLlamaConfig({ ...base, rope_scaling: { type: 'linear', factor: 2.0 } }).ropeScaling).toEqual({ type: 'linear', factor: 2 });
    const c = parseLlamaConfig({ ...base, rope_scaling: undefined, rope_parameters: { rope_type: 'default', rope_theta: 1e6 } });
    expect(c.ropeScaling).toBeNull();
    expect(c.ropeTheta).toBe(1e6);
  });

  it('fills transformers defaults for a minimal config', () => {
    const c = parseLlamaConfig('{"model_type": "llama"}');
    expect(c.vocabSize).toBe(32000);
    expect(c.numHiddenLayers).toBe(32);
    expect(c.numKeyValueHeads).toBe(32);
    expect(c.headDim).toBe(128);
    expect(c.rmsNormEps).toBe(1e-6);
    expect(c.maxPositionEmbeddings).toBe(2048);
    expect(c.bosTokenId).toBe(1);
    expect(c.eosTokenIds).toEqual([2]);
    expect(c.torchDtype).toBeNull();
    expect(parseLlamaConfig({ architectures: ['LlamaForCausalLM'], pad_token_id: -1 }).padTokenId).toBeNull();
  });
});

describe('parseLlamaConfig errors', () => {
  const base = fixture('llama3.2-1b.config.json');
  const bad = (patch: Record<string, unknown>, re: RegExp, Cls: typeof FormatError | typeof UnsupportedFeatureError = FormatError): void => {
    let err: unknown;
    try {
      parseLlamaConfig({ ...base, ...patch }, 'my/config.json');
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(Cls);
    expect((err as Error).message).toMatch(re);
    expect((err as Error).message).toMatch(/my\/config\.json/);
  };
  it('rejects other architectures', () => bad({ model_type: 'mistral', architectures: ['MistralForCausalLM'] }, /not a Llama config.*"mistral"/, UnsupportedFeatureError));
  it('rejects biases and other activations', () => {
    bad({ attention_bias: true }, /attention_bias = true is not supported/, UnsupportedFeatureError);
    bad({ mlp_bias: true }, /mlp_bias = true is not supported/, UnsupportedFeatureError);
    bad({ hidden_act: 'gelu' }, /hidden_act "gelu"/, UnsupportedFeatureError);
  });
  it('rejects unsupported rope types', () => bad({ rope_scaling: { rope_type: 'yarn', factor: 4 } }, /RoPE type "yarn" is not supported/, UnsupportedFeatureError));
  it('rejects non-positive and non-integer sizes', () => {
    bad({ hidden_size: 0 }, /"hidden_size" must be a positive integer, got 0/);
    bad({ num_hidden_layers: 2.5 }, /"num_hidden_layers" must be a positive integer, got 2.5/);
    bad({ vocab_size: '128256' }, /"vocab_size" must be a positive integer/);
    bad({ rms_norm_eps: -1 }, /"rms_norm_eps" must be a positive number/);
  });
  it('rejects heads that do not divide', () => {
    bad({ num_key_value_heads: 5 }, /num_attention_heads \(32\) must be a multiple of num_key_value_heads \(5\)/);
    bad({ head_dim: undefined, hidden_size: 2050 }, /hidden_size \(2050\) must be divisible by num_attention_heads \(32\)/);
  });
  it('rejects malformed llama3 rope scaling', () => {
    bad({ rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4 } }, /original_max_position_embeddings/);
    bad({ rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 4, high_freq_factor: 4, original_max_position_embeddings: 8192 } }, /high_freq_factor \(4\) must exceed low_freq_factor \(4\)/);
  });
  it('rejects bad token ids', () => {
    bad({ eos_token_id: [128001, 'x'] }, /eos_token_id\[1\]/);
    bad({ bos_token_id: 999999 }, /bos_token_id \(999999\) must be < vocab_size \(128256\)/);
  });
  it('rejects non-objects and bad JSON', () => {
    expect(() => parseLlamaConfig('[1]')).toThrow(FormatError);
    expect(() => parseLlamaConfig('{oops')).toThrow(/not valid JSON/);
  });
});

describe('toHfConfigJson', () => {
  it('round-trips every fixture through parse -> json -> parse', () => {
    for (const f of fs.readdirSync(fixtures).filter((x) => x.endsWith('.config.json'))) {
      const c = parseLlamaConfig(fixture(f));
      const j = toHfConfigJson(c);
      expect(j.model_type).toBe('llama');
      expect(j.architectures).toEqual(['LlamaForCausalLM']);
      expect(typeof j.torch_dtype).toBe('string');
      expect(parseLlamaConfig(JSON.parse(JSON.stringify(j)))).toEqual(c);
    }
  });
  it('writes eos as an int when single and rope_scaling with rope_type', () => {
    const j = toHfConfigJson(parseLlamaConfig(fixture('llama3.2-1b.config.json')));
    expect(j.eos_token_id).toBe(128001);
    expect(j.rope_scaling).toMatchObject({ rope_type: 'llama3', factor: 32, original_max_position_embeddings: 8192 });
    expect(Object.keys(j)).toEqual([...Object.keys(j)].sort());
  });
  it('writeLlamaConfig writes a loadable file', () => {
    const d = fs.mkdtempSync(path.join(os.tmpdir(), 'bts-cfg-'));
    const c = parseLlamaConfig(fixture('llama3.1-8b-instruct.rope_parameters.config.json'));
    writeLlamaConfig(path.join(d, 'config.json'), c);
    expect(loadLlamaConfig(path.join(d, 'config.json'))).toEqual(c);
    fs.rmSync(d, { recursive: true });
  });
});

describe('generation_config.json', () => {
  it('reads the eos list and sampling defaults', () => {
    const g = loadGenerationConfig(path.join(fixtures, 'llama3.1-8b-instruct.generation_config.json'));
    expect(g).toEqual({ bosTokenId: 128000, eosTokenIds: [128001, 128008, 128009], padTokenId: null, doSample: true, temperature: 0.6, topP: 0.9, topK: null, maxLength: null, maxNewTokens: null });
    expect(readGenerationConfig({ eos_token_id: 2 }).eosTokenIds).toEqual([2]);
    expect(() => readGenerationConfig({ top_k: 1.5 })).toThrow(/"top_k" must be a non-negative integer/);
  });
});

describe('llamaTensorNames', () => {
  it('lists HF names and [out, in] shapes; lm_head absent when tied', () => {
    const c = parseLlamaConfig(fixture('llama3.2-1b.config.json'));
    const t = llamaTensorNames(c);
    const m = new Map(t.map((x) => [x.name, x.shape]));
    expect(t.length).toBe(2 + 16 * 9);
    expect(m.get('model.embed_tokens.weight')).toEqual([128256, 2048]);
    expect(m.get('model.layers.0.self_attn.q_proj.weight')).toEqual([32 * 64, 2048]);
    expect(m.get('model.layers.15.self_attn.k_proj.weight')).toEqual([8 * 64, 2048]);
    expect(m.get('model.layers.15.self_attn.v_proj.weight')).toEqual([8 * 64, 2048]);
    expect(m.get('model.layers.3.self_attn.o_proj.weight')).toEqual([2048, 32 * 64]);
    expect(m.get('model.layers.3.mlp.gate_proj.weight')).toEqual([8192, 2048]);
    expect(m.get('model.layers.3.mlp.up_proj.weight')).toEqual([8192, 2048]);
    expect(m.get('model.layers.3.mlp.down_proj.weight')).toEqual([2048, 8192]);
    expect(m.get('model.layers.3.input_layernorm.weight')).toEqual([2048]);
    expect(m.get('model.layers.3.post_attention_layernorm.weight')).toEqual([2048]);
    expect(m.get('model.norm.weight')).toEqual([2048]);
    expect(m.has('lm_head.weight')).toBe(false);
    // Llama 3.2 1B has 1.24B parameters.
    const params = t.reduce((s, x) => s + x.shape.reduce((a, b) => a * b, 1), 0);
    expect(params).toBe(1_235_814_400);
    const untied = llamaTensorNames(parseLlamaConfig(fixture('llama2-7b.config.json')));
    expect(untied[untied.length - 1]).toEqual({ name: 'lm_head.weight', shape: [32000, 4096] });
    expect(untied.reduce((s, x) => s + x.shape.reduce((a, b) => a * b, 1), 0)).toBe(6_738_415_616);
  });
});
