/**
 * Causal self-attention with grouped-query heads (GQA), fp32: `out = softmax(scale * q k^T + causal) v`.
 *
 * Shapes (row-major): q [batch, tq, heads, headDim]; k and v [batch, tcap, kvHeads, headDim], a key/value
 * cache of capacity `tcap` whose first `tk` positions are used; out [batch, tq, heads, headDim];
 * lse [batch, heads, tq] (log-sum-exp of each query row's scaled scores, needed by the backward).
 * Query head h reads kv head `h / (heads / kvHeads)`. The queries are the LAST `tq` positions of the
 * sequence: query i sits at position `tk - tq + i` and sees keys `0 ..= tk - tq + i`. Training uses
 * tq = tk = tcap; KV-cached decoding uses tq = 1 (or a few) with tk growing up to tcap.
 *
 * The forward is tiled (flash-attention style, never a [tq, tk] score matrix); the backward recomputes
 * the probabilities tile by tile from q, k and lse. dq, dk, dv are overwritten (activation gradients).
 */
import { ArgumentError, ShapeError } from '../errors.js';
import { defineOp, f32, num, outF32, posInt } from './core.js';

export interface AttentionForwardArgs {
  /** [batch, tq, heads, headDim] queries (already rotated, e.g. by RoPE). */
  q: Float32Array;
  /** [batch, tcap, kvHeads, headDim] keys; only the first `tk` positions are read. */
  k: Float32Array;
  /** [batch, tcap, kvHeads, headDim] values; only the first `tk` positions are read. */
  v: Float32Array;
  /** Number of sequences. Default 1. */
  batch?: number;
  /** Query heads H. */
  heads: number;
  /** Key/value heads Hkv; must divide `heads`. Default `heads` (plain multi-head attention). */
  kvHeads?: number;
  /** Head dimension Dh (elements). */
  headDim: number;
  /** Query positions per sequence. Default: inferred from q.length / (batch * heads * headDim). */
  tq?: number;
  /** Key/value capacity per sequence (positions). Default: inferred from k.length / (batch * kvHeads * headDim). */
  tcap?: number;
  /** Key positions in use, tq <= tk <= tcap. Default `tcap`. */
  tk?: number;
  /** Score scale. Default 1 / sqrt(headDim). */
  scale?: number;
  /** [batch, tq, heads, headDim] output (allocated if omitted). */
  out?: Float32Array;
  /** [batch, heads, tq] receives the row log-sum-exps (allocated if omitted). */
  lse?: Float32Array;
}

interface Dims {
  B: number;
  H: number;
  Hkv: number;
  Dh: number;
}

function dims(op: string, a: { batch?: number; heads: number; kvHeads?: number; headDim: number }): Dims {
  const B = posInt(op, 'batch', a.batch, 1);
  const H = posInt(op, 'heads', a.heads);
  const Hkv = posInt(op, 'kvHeads', a.kvHeads, H);
  const Dh = posInt(op, 'headDim', a.headDim);
  if (H % Hkv !== 0) throw new ArgumentError(`${op}: 'heads' (${H}) must be a multiple of 'kvHeads' (${Hkv})`);
  return { B, H, Hkv, Dh };
}

/** total / per as a positive integer, or a ShapeError naming the argument. */
function seqLen(op: string, name: string, total: number, per: number, perName: string): number {
  if (total === 0 || total % per !== 0)
    throw new ShapeError(`${op}: argument '${name}' has ${total} elements, expected a positive multiple of ${perName} = ${per}`);
  return total / per;
}

const fwd = defineOp((a: AttentionForwardArgs) => {
  const op = 'attentionForward';
  const { B, H, Hkv, Dh } = dims(op, a);
  const q = f32(op, 'q', a.q);
  const k = f32(op, 'k', a.k);
  const perQ = B * H * Dh;
  const perK = B * Hkv * Dh;
  const tq = a.tq === undefined ? seqLen(op, 'q', q.length, perQ, 'batch*heads*headDim') : posInt(op, 'tq', a.tq);
  f32(op, 'q', q, tq * perQ, 'batch*tq*heads*headDim');
  const tcap = a.tcap === undefined ? seqLen(op, 'k', k.length, perK, 'batch*kvHeads*headDim') : posInt(op, 'tcap', a.tcap);
  f32(op, 'k', k, tcap * perK, 'batch*tcap*kvHeads*headDim');
  const v = f32(op, 'v', a.v, tcap * perK, 'batch*tcap*kvHeads*headDim');
  const tk = posInt(op, 'tk', a.tk, tcap);
  if (tk > tcap) throw new ArgumentError(`${op}: 'tk' (${tk}) must be <= tcap (${tcap})`);
  if (tq > tk) throw new ArgumentError(`${op}: 'tq' (${tq}) must be <= 'tk' (${tk})`);
  const scale = num(op, 'scale', a.scale, 1 / Math.sqrt(Dh));
  const out = outF32(op, 'out', a.out, tq * perQ, 'batch*tq*heads*headDim');
  const lse = outF32(op, 'lse', a.lse, B * H * tq, 'batch*heads*tq');
  return {
    op: 'attention_forward',
    tensors: [q, k, v, out, lse],
    scalars: [B, tq, tk, tcap, H, Hkv, Dh, scale],
    result: { out, lse },
  };
});
/** Causal GQA attention forward. Returns `{ out, lse }`. */
export const attentionForward = fwd.sync;
/** Causal GQA attention forward on the compute pool, off the event loop. */
export const attentionForwardAsync = fwd.async;

export interface AttentionBackwardArgs {
  /** [batch, T, heads, headDim] forward queries. */
  q: Float32Array;
  /** [batch, T, kvHeads, headDim] forward keys (tq = tk = tcap = T: training). */
  k: Float32Array;
  /** [batch, T, kvHeads, headDim] forward values. */
  v: Float32Array;
  /** [batch, T, heads, headDim] forward output. */
  out: Float32Array;
  /** [batch, heads, T] from the forward. */
  lse: Float32Array;
  /** [batch, T, heads, headDim] gradient of the output. */
  dout: Float32Array;
  /** Number of sequences. Default 1. */
  batch?: number;
  /** Query heads H. */
  heads: number;
  /** Key/value heads Hkv; must divide `heads`. Default `heads`. */
  kvHeads?: number;
  /** Head dimension Dh. */
  headDim: number;
  /** Score scale, as in the forward. Default 1 / sqrt(headDim). */
  scale?: number;
  /** [batch, T, heads, headDim] receives dL/dq, overwritten (allocated if omitted). */
  dq?: Float32Array;
  /** [batch, T, kvHeads, headDim] receives dL/dk, overwritten (allocated if omitted). */
  dk?: Float32Array;
  /** [batch, T, kvHeads, headDim] receives dL/dv, overwritten (allocated if omitted). */
  dv?: Float32Array;
}

const bwd = defineOp((a: AttentionBackwardArgs) => {
  const op = 'attentionBackward';
  const { B, H, Hkv, Dh } = dims(op, a);
  const q = f32(op, 'q', a.q);
  const T = seqLen(op, 'q', q.length, B * H * Dh, 'batch*heads*headDim');
  const nq = B * T * H * Dh;
  const nk = B * T * Hkv * Dh;
  const k = f32(op, 'k', a.k, nk, 'batch*T*kvHeads*headDim');
  const v = f32(op, 'v', a.v, nk, 'batch*T*kvHeads*headDim');
  const out = f32(op, 'out', a.out, nq, 'batch*T*heads*headDim');
  const lse = f32(op, 'lse', a.lse, B * H * T, 'batch*heads*T');
  const dout = f32(op, 'dout', a.dout, nq, 'batch*T*heads*headDim');
  const scale = num(op, 'scale', a.scale, 1 / Math.sqrt(Dh));
  const dq = outF32(op, 'dq', a.dq, nq, 'batch*T*heads*headDim');
  const dk = outF32(op, 'dk', a.dk, nk, 'batch*T*kvHeads*headDim');
  const dv = outF32(op, 'dv', a.dv, nk, 'batch*T*kvHeads*headDim');
  return {
    op: 'attention_backward',
    tensors: [q, k, v, out, lse, dout, dq, dk, dv],
    scalars: [B, T, H, Hkv, Dh, scale],
    result: { dq, dk, dv },
  };
});
/** Causal GQA attention backward (tq = tk = T). Returns `{ dq, dk, dv }`, all overwritten. */
export const attentionBackward = bwd.sync;
/** Causal GQA attention backward, async. */
export const attentionBackwardAsync = bwd.async;
