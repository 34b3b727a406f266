/**
 * A Llama decoder (forward, full backward, KV-cached decode) composed from OUR public ops, as a
 * test-side oracle: llama.test.ts compares it with the PyTorch goldens of make_golden.py. It checks
 * the op contract as the engine will use it (layouts, GEMM transposes, RoPE pairing and tables, GQA
 * head mapping, KV-cache indexing, fused LM-head cross-entropy, gradient accumulation), so clarity
 * comes before speed: one op call per step, every buffer named, shapes in the comments.
 *
 * The block-level pieces (`blockContext`, `embed`, `blockForward` with or without saved activations,
 * `blockBackward` with weight gradients or input gradients only) are exported for stitch-ops.ts, the
 * stitched model's oracle, whose frozen blocks run forward-only or input-gradient-only; trainStep is
 * built from the same pieces, so llama.test.ts checks them against PyTorch.
 *
 * Legend: B batch, T sequence, N = B*T rows, V vocab, D hidden, F intermediate, H query heads,
 * Hkv key/value heads, Dh head dim, L layers. Linear weights are [out, in] (HF): forward y = x W^T
 * (GEMM NT), input gradient dx = dy W (NN), weight gradient dW += dy^T x (TN, beta 1).
 */
import * as path from 'node:path';
import { loadLlamaConfig, llamaTensorNames, openSafetensors, ops, type LlamaConfig } from '../../lib/index.js';

export interface LayerWeights {
  inNorm: Float32Array; // [D]   input_layernorm
  wq: Float32Array; //     [H*Dh, D]
  wk: Float32Array; //     [Hkv*Dh, D]
  wv: Float32Array; //     [Hkv*Dh, D]
  wo: Float32Array; //     [D, H*Dh]
  postNorm: Float32Array; // [D] post_attention_layernorm
  wGate: Float32Array; //  [F, D]
  wUp: Float32Array; //    [F, D]
  wDown: Float32Array; //  [D, F]
}

export interface LlamaModel {
  config: LlamaConfig;
  /** Every weight by its HF name (fp32 copies, so tests may modify them). */
  tensors: Map<string, Float32Array>;
  embed: Float32Array; //  [V, D]
  layers: LayerWeights[];
  norm: Float32Array; //   [D]
  lmHead: Float32Array; // [V, D]
}

/** Builds the structured view of a name -> tensor map (the arrays are shared, not copied). */
export function modelFromTensors(config: LlamaConfig, tensors: Map<string, Float32Array>): LlamaModel {
  const t = (name: string): Float32Array => {
    const a = tensors.get(name);
    if (!a) throw new Error(`missing weight ${name}`);
    return a;
  };
  const layers: LayerWeights[] = [];
  for (let i = 0; i < config.numHiddenLayers; i++) {
    const p = `model.layers.${i}`;
    layers.push({
      inNorm: t(`${p}.input_layernorm.weight`),
      wq: t(`${p}.self_attn.q_proj.weight`),
      wk: t(`${p}.self_attn.k_proj.weight`),
      wv: t(`${p}.self_attn.v_proj.weight`),
      wo: t(`${p}.self_attn.o_proj.weight`),
      postNorm: t(`${p}.post_attention_layernorm.weight`),
      wGate: t(`${p}.mlp.gate_proj.weight`),
      wUp: t(`${p}.mlp.up_proj.weight`),
      wDown: t(`${p}.mlp.down_proj.weight`),
    });
  }
  return {
    config,
    tensors,
    embed: t('model.embed_tokens.weight'),
    layers,
    norm: t('model.norm.weight'),
    lmHead: config.tieWordEmbeddings ? t('model.embed_tokens.weight') : t('lm_head.weight'),
  };
}

/** Reads `dir`/config.json and `dir`/model.safetensors, checking every expected weight's shape. */
export function loadModel(dir: string): LlamaModel {
  const config = loadLlamaConfig(path.join(dir, 'config.json'));
  const tensors = new Map<string, Float32Array>();
  using st = openSafetensors(path.join(dir, 'model.safetensors'));
  for (const { name, shape } of llamaTensorNames(config)) {
    const info = st.tensors.get(name);
    if (!info) throw new Error(`${dir}: missing weight ${name}`);
    if (info.shape.join(',') !== shape.join(',')) throw new Error(`${name}: shape [${info.shape}] != [${shape}]`);
    tensors.set(name, Float32Array.from(st.getF32(name)));
  }
  return modelFromTensors(config, tensors);
}

// ---------------------------------------------------------------------------------------------------
// Linear layers (thin wrappers that name the three GEMM layouts).

/** y [n, out] = x [n, in] W^T, W [out, in]  (GEMM NT). */
function linear(x: Float32Array, w: Float32Array, n: number, inF: number, outF: number): Float32Array {
  return ops.gemm({ a: x, b: w, m: n, n: outF, k: inF, transB: true });
}

/** dx [n, in] (= or +=, by beta) dy [n, out] W [out, in]  (GEMM NN). */
function linearDx(dy: Float32Array, w: Float32Array, n: number, inF: number, outF: number, dx?: Float32Array, beta = 0): Float32Array {
  return ops.gemm({ a: dy, b: w, c: dx, m: n, n: inF, k: outF, beta });
}

/** dW [out, in] += dy^T [out, n] x [n, in]  (GEMM TN, accumulated). */
function linearDw(dy: Float32Array, x: Float32Array, dw: Float32Array, n: number, inF: number, outF: number): void {
  ops.gemm({ a: dy, b: x, c: dw, m: outF, n: inF, k: n, transA: true, beta: 1 });
}

function add(a: Float32Array, b: Float32Array): Float32Array {
  const out = new Float32Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = a[i] + b[i];
  return out;
}

/** The RoPE cos/sin table [P, Dh/2, 2] for positions 0..P-1, with the config's Llama 3 scaling. */
export function ropeTableFor(config: LlamaConfig, positions: number): Float32Array {
  const s = config.ropeScaling;
  if (s && s.type !== 'llama3') throw new Error(`oracle: RoPE scaling ${s.type} is not implemented`);
  return ops.ropeTable({
    positions,
    headDim: config.headDim,
    theta: config.ropeTheta,
    scaling: s ? { factor: s.factor, lowFreqFactor: s.lowFreqFactor, highFreqFactor: s.highFreqFactor, originalMaxPositionEmbeddings: s.originalMaxPositionEmbeddings } : null,
  }).table;
}

// ---------------------------------------------------------------------------------------------------
// Training step: forward, loss, backward.

/** What the forward keeps per layer for the backward. */
export interface LayerSaved {
  x: Float32Array; //     [N, D] residual stream entering the block
  a: Float32Array; //     [N, D] input_layernorm(x)
  rstd1: Float32Array; // [N]
  q: Float32Array; //     [B, T, H, Dh] after RoPE
  k: Float32Array; //     [B, T, Hkv, Dh] after RoPE
  v: Float32Array; //     [B, T, Hkv, Dh]
  att: Float32Array; //   [B, T, H, Dh] attention output (o_proj input)
  lse: Float32Array; //   [B, H, T]
  h: Float32Array; //     [N, D] x + o_proj(att)
  m: Float32Array; //     [N, D] post_attention_layernorm(h)
  rstd2: Float32Array; // [N]
  gate: Float32Array; //  [N, F]
  up: Float32Array; //    [N, F]
  act: Float32Array; //   [N, F] silu(gate) * up (down_proj input)
}

/** What every block of a [B, T] batch at positions 0..T-1 shares: sizes, positions, RoPE table. */
export interface BlockContext {
  B: number;
  T: number;
  /** B*T rows. */
  N: number;
  /** [N] position of each row: t for row b*T + t. */
  pos: Int32Array;
  /** RoPE cos/sin table [T, Dh/2, 2]. */
  table: Float32Array;
}

/** The {@link BlockContext} of a [B, T] batch at positions 0..T-1. */
export function blockContext(config: LlamaConfig, B: number, T: number): BlockContext {
  const pos = new Int32Array(B * T);
  for (let b = 0; b < B; b++) for (let t = 0; t < T; t++) pos[b * T + t] = t;
  return { B, T, N: B * T, pos, table: ropeTableFor(config, T) };
}

/** Token embeddings [N, D] of ids [N]. */
export function embed(model: LlamaModel, ids: Int32Array): Float32Array {
  return ops.embeddingForward({ ids, table: model.embed, dim: model.config.hiddenSize }).out;
}

/**
 * Decoder block `i` (0-based) on the residual stream x [N, D]: returns y [N, D] and, when `save`,
 * the activations its backward needs (without `save` nothing is kept: a forward-only block).
 */
export function blockForward(model: LlamaModel, i: number, x: Float32Array, ctx: BlockContext, save: boolean): { y: Float32Array; saved: LayerSaved | null } {
  const c = model.config;
  const { hiddenSize: D, intermediateSize: F, numAttentionHeads: H, numKeyValueHeads: Hkv, headDim: Dh, rmsNormEps: eps } = c;
  const { B, T, N, pos, table } = ctx;
  const QD = H * Dh; //  q width
  const KD = Hkv * Dh; // k / v width
  const w = model.layers[i];
  const { out: a, rstd: rstd1 } = ops.rmsnormForward({ x, weight: w.inNorm, eps }); // [N, D], [N]
  const q = linear(a, w.wq, N, D, QD); // [N, H*Dh] = [B, T, H, Dh]
  const k = linear(a, w.wk, N, D, KD); // [N, Hkv*Dh] = [B, T, Hkv, Dh]
  const v = linear(a, w.wv, N, D, KD); // [B, T, Hkv, Dh]
  ops.ropeForward({ x: q, out: q, pos, table, headDim: Dh, heads: H }); // in place
  ops.ropeForward({ x: k, out: k, pos, table, headDim: Dh, heads: Hkv });
  const { out: att, lse } = ops.attentionForward({ q, k, v, batch: B, heads: H, kvHeads: Hkv, headDim: Dh, tq: T, tk: T, tcap: T }); // [B,T,H,Dh], [B,H,T]
  const h = add(x, linear(att, w.wo, N, QD, D)); // [N, D] residual
  const { out: m, rstd: rstd2 } = ops.rmsnormForward({ x: h, weight: w.postNorm, eps }); // [N, D]
  const gate = linear(m, w.wGate, N, D, F); // [N, F]
  const up = linear(m, w.wUp, N, D, F); //     [N, F]
  const act = ops.swigluForward({ gate, up }).h; // [N, F]
  const y = add(h, linear(act, w.wDown, N, F, D)); // [N, D] residual
  return { y, saved: save ? { x, a, rstd1, q, k, v, att, lse, h, m, rstd2, gate, up, act } : null };
}

/**
 * Backward of decoder block `i` given dy [N, D] (gradient of its output): returns dx [N, D]. With
 * `grads` (a map holding a buffer for every weight name of the block) the weight gradients are
 * accumulated into it; with `grads` null the block is frozen: input gradients only, no dW GEMM
 * and no norm-weight reduction is run.
 */
export function blockBackward(model: LlamaModel, i: number, s: LayerSaved, dy: Float32Array, ctx: BlockContext, grads: Map<string, Float32Array> | null): Float32Array {
  const c = model.config;
  const { hiddenSize: D, intermediateSize: F, numAttentionHeads: H, numKeyValueHeads: Hkv, headDim: Dh } = c;
  const { N, pos, table } = ctx;
  const QD = H * Dh;
  const KD = Hkv * Dh;
  const w = model.layers[i];
  const p = `model.layers.${i}`;
  const g = (name: string): Float32Array => {
    const a = grads!.get(`${p}.${name}`);
    if (!a) throw new Error(`blockBackward: no gradient buffer for ${p}.${name}`);
    return a;
  };
  // MLP: y = h + down(silu(gate(m)) * up(m)), m = norm2(h)
  const dAct = linearDx(dy, w.wDown, N, F, D); //                          [N, F]
  if (grads) linearDw(dy, s.act, g('mlp.down_proj.weight'), N, F, D);
  const { dgate, dup } = ops.swigluBackward({ gate: s.gate, up: s.up, dh: dAct }); // [N, F] each
  const dm = linearDx(dgate, w.wGate, N, D, F); //                         [N, D]
  linearDx(dup, w.wUp, N, D, F, dm, 1); //                                 dm += dup W_up
  if (grads) {
    linearDw(dgate, s.m, g('mlp.gate_proj.weight'), N, D, F);
    linearDw(dup, s.m, g('mlp.up_proj.weight'), N, D, F);
  }
  const dhNorm = ops.rmsnormBackward({ x: s.h, weight: w.postNorm, rstd: s.rstd2, dout: dm, dweight: grads ? g('post_attention_layernorm.weight') : null }).dx;
  const dh = add(dy, dhNorm); //                                            [N, D] residual: both paths
  // attention: h = x + o(attn(rope(q(a)), rope(k(a)), v(a))), a = norm1(x)
  const dAtt = linearDx(dh, w.wo, N, QD, D); //                            [B, T, H, Dh]
  if (grads) linearDw(dh, s.att, g('self_attn.o_proj.weight'), N, QD, D);
  const { dq, dk, dv } = ops.attentionBackward({ q: s.q, k: s.k, v: s.v, out: s.att, lse: s.lse, dout: dAtt, batch: ctx.B, heads: H, kvHeads: Hkv, headDim: Dh });
  ops.ropeForward({ x: dq, out: dq, pos, table, headDim: Dh, heads: H, inverse: true }); //   un-rotate: R^T dq
  ops.ropeForward({ x: dk, out: dk, pos, table, headDim: Dh, heads: Hkv, inverse: true });
  const da = linearDx(dq, w.wq, N, D, QD); //                               [N, D]
  linearDx(dk, w.wk, N, D, KD, da, 1);
  linearDx(dv, w.wv, N, D, KD, da, 1);
  if (grads) {
    linearDw(dq, s.a, g('self_attn.q_proj.weight'), N, D, QD);
    linearDw(dk, s.a, g('self_attn.k_proj.weight'), N, D, KD);
    linearDw(dv, s.a, g('self_attn.v_proj.weight'), N, D, KD);
  }
  const dxNorm = ops.rmsnormBackward({ x: s.x, weight: w.inNorm, rstd: s.rstd1, dout: da, dweight: grads ? g('input_layernorm.weight') : null }).dx;
  return add(dh, dxNorm); //                                                [N, D] into the block below
}

export interface StepResult {
  /** Mean cross-entropy over the counted targets. */
  loss: number;
  /** Targets counted (not -100). */
  count: number;
  /** [B, T, V] logits (a separate GEMM: the loss itself never materialises them). */
  logits: Float32Array;
  /** Gradient of the mean loss for every weight, by HF name. */
  grads: Map<string, Float32Array>;
}

/**
 * One training step's forward and backward on ids [B, T] with next-token targets [B, T] (-100 =
 * ignored), at positions 0..T-1 of every row.
 */
export function trainStep(model: LlamaModel, ids: Int32Array, targets: Int32Array, B: number, T: number): StepResult {
  const c = model.config;
  const { vocabSize: V, hiddenSize: D, rmsNormEps: eps } = c;
  const ctx = blockContext(c, B, T);
  const N = ctx.N;

  // ---- forward
  let x = embed(model, ids); // [N, D]
  const saved: LayerSaved[] = [];
  for (let i = 0; i < c.numHiddenLayers; i++) {
    const r = blockForward(model, i, x, ctx, true);
    saved.push(r.saved!);
    x = r.y;
  }
  const { out: xf, rstd: rstdF } = ops.rmsnormForward({ x, weight: model.norm, eps }); // [N, D] final norm
  const logits = linear(xf, model.lmHead, N, D, V); // [N, V] = [B, T, V], for comparison only

  // ---- loss and its gradient (fused LM head): dL/dxf [N, D], dL/dlm_head [V, D]
  let count = 0;
  for (const t of targets) if (t !== -100) count++;
  const grads = new Map<string, Float32Array>();
  for (const { name, shape } of llamaTensorNames(c)) grads.set(name, new Float32Array(shape.reduce((p, s) => p * s, 1)));
  const g = (name: string): Float32Array => grads.get(name)!;
  const ce = ops.crossEntropy({ x: xf, weight: model.lmHead, targets, backward: true, dweight: c.tieWordEmbeddings ? g('model.embed_tokens.weight') : g('lm_head.weight'), gradScale: 1 / count });
  if (ce.count !== count) throw new Error(`crossEntropy counted ${ce.count} targets, expected ${count}`);

  // ---- backward
  // final norm: dx [N, D] = gradient of the residual stream after the last block
  let dx = ops.rmsnormBackward({ x, weight: model.norm, rstd: rstdF, dout: ce.dx!, dweight: g('model.norm.weight') }).dx;
  for (let i = c.numHiddenLayers - 1; i >= 0; i--) dx = blockBackward(model, i, saved[i], dx, ctx, grads);
  ops.embeddingBackward({ ids, dout: dx, dtable: g('model.embed_tokens.weight'), dim: D });
  return { loss: ce.loss, count, logits, grads };
}

// ---------------------------------------------------------------------------------------------------
// KV-cached generation path (batch 1).

/** A KV cache for one sequence: per layer k and v [1, tcap, Hkv, Dh]; `len` positions filled. */
export interface KvCache {
  tcap: number;
  len: number;
  k: Float32Array[];
  v: Float32Array[];
  table: Float32Array; // RoPE table [tcap, Dh/2, 2]
}

export function newCache(model: LlamaModel, tcap: number): KvCache {
  const c = model.config;
  const size = tcap * c.numKeyValueHeads * c.headDim;
  return {
    tcap,
    len: 0,
    k: Array.from({ length: c.numHiddenLayers }, () => new Float32Array(size)),
    v: Array.from({ length: c.numHiddenLayers }, () => new Float32Array(size)),
    table: ropeTableFor(c, tcap),
  };
}

/**
 * Feeds `tokens` (n >= 1: a prefill, or 1 for a decode step) at positions cache.len .. cache.len+n-1,
 * appending their keys/values to the cache; returns the logits [V] of the last token.
 */
export function feed(model: LlamaModel, cache: KvCache, tokens: Int32Array): Float32Array {
  const c = model.config;
  const { vocabSize: V, hiddenSize: D, intermediateSize: F, numAttentionHeads: H, numKeyValueHeads: Hkv, headDim: Dh, rmsNormEps: eps } = c;
  const n = tokens.length;
  const start = cache.len;
  const tk = start + n; // keys in use after this call
  if (tk > cache.tcap) throw new Error(`KV cache full (${tk} > ${cache.tcap})`);
  const QD = H * Dh;
  const KD = Hkv * Dh;
  const pos = Int32Array.from({ length: n }, (_, i) => start + i); // [n]
  let x = ops.embeddingForward({ ids: tokens, table: model.embed, dim: D }).out; // [n, D]
  model.layers.forEach((w, i) => {
    const a = ops.rmsnormForward({ x, weight: w.inNorm, eps }).out; // [n, D]
    const q = linear(a, w.wq, n, D, QD); // [1, n, H, Dh]
    const k = linear(a, w.wk, n, D, KD); // [n, Hkv, Dh]
    const v = linear(a, w.wv, n, D, KD);
    ops.ropeForward({ x: q, out: q, pos, table: cache.table, headDim: Dh, heads: H });
    ops.ropeForward({ x: k, out: k, pos, table: cache.table, headDim: Dh, heads: Hkv });
    cache.k[i].set(k, start * KD); // rows start .. start+n-1 of [1, tcap, Hkv, Dh]
    cache.v[i].set(v, start * KD);
    // queries are the last n of tk positions: query j sees keys 0 ..= start + j
    const att = ops.attentionForward({ q, k: cache.k[i], v: cache.v[i], batch: 1, heads: H, kvHeads: Hkv, headDim: Dh, tq: n, tk, tcap: cache.tcap }).out; // [1, n, H, Dh]
    const h = add(x, linear(att, w.wo, n, QD, D)); // [n, D]
    const m = ops.rmsnormForward({ x: h, weight: w.postNorm, eps }).out;
    const act = ops.swigluForward({ gate: linear(m, w.wGate, n, D, F), up: linear(m, w.wUp, n, D, F) }).h; // [n, F]
    x = add(h, linear(act, w.wDown, n, F, D)); // [n, D]
  });
  cache.len = tk;
  const last = x.slice((n - 1) * D, n * D); // [1, D] the last token's state
  const xf = ops.rmsnormForward({ x: last, weight: model.norm, eps }).out;
  return linear(xf, model.lmHead, 1, D, V); // [V]
}

/**
 * Row `ids` (1-D): prefill its first `prefill` tokens, then feed the next `steps` one at a time.
 * Returns the logits of the fed single tokens, [steps, V]. `tcap` defaults to prefill + steps + 3
 * (a cache larger than used, as in real decoding).
 */
export function decode(model: LlamaModel, ids: Int32Array, prefill: number, steps: number, tcap = prefill + steps + 3): Float32Array {
  const V = model.config.vocabSize;
  const cache = newCache(model, tcap);
  feed(model, cache, ids.slice(0, prefill));
  const out = new Float32Array(steps * V);
  for (let s = 0; s < steps; s++) out.set(feed(model, cache, ids.slice(prefill + s, prefill + s + 1)), s * V);
  return out;
}
