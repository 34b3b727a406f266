// Shared helpers of the native stitched-model tests (test/engine/stitched*.test.ts): random Llama
// models and stitch tensors, and the bridge from the TS oracle's StitchedModel (test/golden/stitch-ops.ts)
// to the native stitchedCreate, so both sides compute on the same arrays.
import { stitchedCreate, type NativeStitched, type NativeStitchSpec } from '../../lib/engine/stitched-native.js';
import { llamaTensorNames, type LlamaConfig } from '../../lib/index.js';
import { stitchTensorNames, type StitchSpec } from '../../lib/stitch/layout.js';
import { modelFromTensors, type LlamaModel } from '../golden/llama-ops.js';
import type { StitchedModel } from '../golden/stitch-ops.js';
import { randn } from '../helpers.js';

/** A full hf-config LlamaConfig from the engine's sizes. */
export function config(s: { V: number; D: number; F: number; L: number; H: number; Hkv: number; Dh: number; tie?: boolean; maxPos?: number }): LlamaConfig {
  return {
    vocabSize: s.V,
    hiddenSize: s.D,
    intermediateSize: s.F,
    numHiddenLayers: s.L,
    numAttentionHeads: s.H,
    numKeyValueHeads: s.Hkv,
    headDim: s.Dh,
    rmsNormEps: 1e-5,
    ropeTheta: 10000,
    ropeScaling: null,
    maxPositionEmbeddings: s.maxPos ?? 64,
    tieWordEmbeddings: s.tie ?? false,
    bosTokenId: null,
    eosTokenIds: [],
    padTokenId: null,
    torchDtype: null,
  };
}

/** A random Llama model: matrices U(-1, 1)/sqrt(in) scaled, norms near 1, embeddings U(-1, 1). */
export function randomModel(c: LlamaConfig, seed: number): LlamaModel {
  const tensors = new Map<string, Float32Array>();
  let s = seed * 1000;
  for (const { name, shape } of llamaTensorNames(c)) {
    const n = shape.reduce((a, b) => a * b, 1);
    if (shape.length === 1) tensors.set(name, randn(n, s++, 0.8, 1.2));
    else if (name === 'model.embed_tokens.weight') tensors.set(name, randn(n, s++, -1, 1));
    else {
      const a = 1.5 / Math.sqrt(shape[1]);
      tensors.set(name, randn(n, s++, -a, a));
    }
  }
  return modelFromTensors(c, tensors);
}

/** Random stitch tensors: projections near the identity, gates giving logits of order 1. */
export function randomStitches(D: number, n: number, stitches: StitchSpec[], seed: number): Map<string, Float32Array> {
  const out = new Map<string, Float32Array>();
  let s = seed * 1000 + 7;
  for (const t of stitchTensorNames(D, n, stitches)) {
    const len = t.shape[0] * t.shape[1];
    if (t.kind === 'gate') out.set(t.name, randn(len, s++, -2 / Math.sqrt(D), 2 / Math.sqrt(D)));
    else {
      const w = randn(len, s++, -0.5 / Math.sqrt(D), 0.5 / Math.sqrt(D));
      for (let i = 0; i < D; i++) w[i * D + i] += 1;
      out.set(t.name, w);
    }
  }
  return out;
}

/** Identity projections and zero gates (the package's default init). */
export function identityZeroStitches(D: number, n: number, stitches: StitchSpec[]): Map<string, Float32Array> {
  const out = new Map<string, Float32Array>();
  for (const t of stitchTensorNames(D, n, stitches)) {
    const w = new Float32Array(t.shape[0] * t.shape[1]);
    if (t.kind === 'proj') for (let i = 0; i < D; i++) w[i * D + i] = 1;
    out.set(t.name, w);
  }
  return out;
}

export function weightsOf(m: LlamaModel): Record<string, Float32Array> {
  return Object.fromEntries(m.tensors);
}

export function specOf(m: StitchedModel, gateDropout = 0): NativeStitchSpec {
  return { stitches: m.stitches, expertStream: m.expertStream, hubBias: m.hubBias, gateDropout };
}

/** Zeroed gradient buffers for every stitch tensor of `m`. */
export function zeroGrads(m: StitchedModel): Record<string, Float32Array> {
  return Object.fromEntries([...m.tensors].map(([k, v]) => [k, new Float32Array(v.length)]));
}

/**
 * The native stitched model over the oracle model's arrays (the same Float32Arrays: edits of
 * m.tensors are seen by both). Returns it with its gradient buffers (null: frozen).
 */
export function nativeOf(m: StitchedModel, opts: { grads?: boolean; gateDropout?: number } = {}): { net: NativeStitched; grads: Record<string, Float32Array> | null } {
  const grads = opts.grads === false ? null : zeroGrads(m);
  const net = stitchedCreate(m.hub.config, weightsOf(m.hub), m.experts.map(weightsOf), specOf(m, opts.gateDropout ?? 0), Object.fromEntries(m.tensors), grads);
  return { net, grads };
}

/** Next-token data: ids [B, T] in [0, V), targets the next id (-100 at each row's end and at `ignore`). */
export function batch(V: number, B: number, T: number, seed: number, ignore: number[] = []): { ids: Int32Array; targets: Int32Array } {
  const r = randn(B * T, seed, 0, 1);
  const ids = Int32Array.from(r, (x) => Math.min(V - 1, Math.floor(x * V)));
  const targets = Int32Array.from({ length: B * T }, (_, i) => (i % T === T - 1 || ignore.includes(i) ? -100 : ids[i + 1]));
  return { ids, targets };
}
