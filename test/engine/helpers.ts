// Shared helpers of the native-engine tests (test/engine/*.test.ts): small random Llama configs and
// weights, the record forms llamaCreate takes, and the test-side oracle (test/golden/llama-ops.ts).
import { f32ToBf16, llamaTensorNames, type LlamaConfig } from '../../lib/index.js';
import { rng } from '../helpers.js';
import { modelFromTensors, type LlamaModel } from '../golden/llama-ops.js';

/** A LlamaConfig with the given sizes (odd ones by default: V 37, D 40, H 5, Hkv 1, Dh 8, F 56, L 2). */
export function smallConfig(over: Partial<LlamaConfig> = {}): LlamaConfig {
  return {
    vocabSize: 37,
    hiddenSize: 40,
    intermediateSize: 56,
    numHiddenLayers: 2,
    numAttentionHeads: 5,
    numKeyValueHeads: 1,
    headDim: 8,
    rmsNormEps: 1e-5,
    ropeTheta: 10000,
    ropeScaling: null,
    maxPositionEmbeddings: 64,
    tieWordEmbeddings: false,
    bosTokenId: null,
    eosTokenIds: [],
    padTokenId: null,
    torchDtype: null,
    ...over,
  };
}

/** Standard-normal sample (Box-Muller over the seeded PRNG). */
function normal(r: () => number): number {
  const u = Math.max(r(), 1e-12);
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * r());
}

/**
 * Random weights by HF name (as make_golden.py: matrices N(0, 0.2), embeddings N(0, 1), norm gains
 * 1 + 0.2 N(0, 1)).
 */
export function randomTensors(config: LlamaConfig, seed: number): Map<string, Float32Array> {
  const r = rng(seed);
  const out = new Map<string, Float32Array>();
  for (const { name, shape } of llamaTensorNames(config)) {
    const n = shape.reduce((a, b) => a * b, 1);
    const a = new Float32Array(n);
    const norm = shape.length === 1;
    const std = name.includes('embed') || name.startsWith('lm_head') ? 1 : 0.2;
    for (let i = 0; i < n; i++) a[i] = norm ? 1 + 0.2 * normal(r) : std * normal(r);
    out.set(name, a);
  }
  return out;
}

/** The oracle's model over the same arrays. */
export function oracleModel(config: LlamaConfig, tensors: Map<string, Float32Array>): LlamaModel {
  return modelFromTensors(config, tensors);
}

/** name -> array record for llamaCreate. */
export function record<T>(m: Map<string, T>): Record<string, T> {
  return Object.fromEntries(m);
}

/** Zeroed gradient buffers for every tensor (or the names given). */
export function zeroGrads(config: LlamaConfig, names?: (name: string) => boolean): Record<string, Float32Array> {
  const g: Record<string, Float32Array> = {};
  for (const { name, shape } of llamaTensorNames(config)) if (!names || names(name)) g[name] = new Float32Array(shape.reduce((a, b) => a * b, 1));
  return g;
}

/** Block matrices (q/k/v/o, gate/up/down), the tensors bf16 mixed precision keeps as bf16. */
export function isBlockMatrix(name: string): boolean {
  return /\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$/.test(name);
}

/** bf16 bits of every tensor `pick` selects; the others as fp32. Also returns the widened fp32 copies. */
export function bf16Weights(tensors: Map<string, Float32Array>, pick: (name: string) => boolean) {
  const weights: Record<string, Float32Array | Uint16Array> = {};
  const widened = new Map<string, Float32Array>();
  for (const [name, w] of tensors) {
    if (pick(name)) {
      const b = f32ToBf16(w);
      weights[name] = b;
      const f = new Float32Array(b.length);
      const u = new Uint32Array(f.buffer);
      for (let i = 0; i < b.length; i++) u[i] = b[i] << 16;
      widened.set(name, f);
    } else {
      weights[name] = w;
      widened.set(name, w);
    }
  }
  return { weights, widened };
}

/** Next-token targets of ids [B, T] (shifted within each row; the last position and `extraIgnored` more are -100). */
export function nextTokenTargets(ids: Int32Array, B: number, T: number, extraIgnored: number[] = []): Int32Array {
  const t = new Int32Array(B * T);
  for (let b = 0; b < B; b++) for (let i = 0; i < T; i++) t[b * T + i] = i + 1 < T ? ids[b * T + i + 1] : -100;
  for (const i of extraIgnored) t[i] = -100;
  return t;
}

/** Targets that are not -100. */
export function counted(targets: Int32Array): number {
  let n = 0;
  for (const t of targets) if (t !== -100) n++;
  return n;
}
