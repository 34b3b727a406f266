/**
 * The fused stitch mixes of Branch-Train-Stitch (see METHOD.md, "The stitch layer"): the per-dim,
 * per-model gate over the hub and n experts and the weighted mix, forward and backward, without ever
 * storing the gate (the backward recomputes it from the logits).
 *
 * With M = n + 1 models, the gate logits of one token are [D, M] (model fastest):
 * `gate[(t*D + d)*M + m]`. The projections (`p_i = W_proj_i h_i`, `q_i = W_proj_i h_0`) and the logits
 * (`W_gate h_0`) are GEMMs done before these ops.
 *
 * - Experts-into-hub (E->H): `g = softmax_m(gate[t, d, :])`, `out = g_0 h0 + sum_i g_i p_i`.
 * - Hub-into-experts (H->E): `g_i = sigmoid(gate[t, d, i])` (slot 0 unused),
 *   `out_i = (1 - g_i) h_i + g_i q_i`.
 *
 * The mix is element-wise over (token, dim), so only N*D matters and is read from the lengths:
 * h0 / out [N, D] = N*D, p / h / q [n, N, D], gate [N, D*(n+1)]; `experts` (n) must be given.
 * Backward: every gradient is overwritten (dG of H->E has slot 0 set to 0).
 */
import { ShapeError } from '../errors.js';
import { defineOp, f32, outF32, posInt } from './core.js';

function experts(op: string, v: unknown): number {
  return posInt(op, 'experts', v);
}

/** N*D and the scalars [N, D, n] the native op takes (it only uses their product). */
function flatDims(op: string, name: string, len: number, n: number, perModel: number): { ND: number; scalars: number[] } {
  if (len % perModel !== 0) throw new ShapeError(`${op}: argument '${name}' has ${len} elements, not a multiple of ${perModel}`);
  const ND = len / perModel;
  return { ND, scalars: ND === 0 ? [0, 1, n] : [1, ND, n] };
}

export interface StitchEHForwardArgs {
  /** [N, D] hub state h_0. */
  h0: Float32Array;
  /** [n, N, D] projected expert states p_i = W_proj_i h_i. */
  p: Float32Array;
  /** [N, D*(n+1)] gate logits W_gate h_0, [D, n+1] per token (model fastest). */
  gate: Float32Array;
  /** Number of experts n (>= 1). */
  experts: number;
  /** [N, D] new hub state (allocated if omitted; may be h0). */
  out?: Float32Array;
}

const ehFwd = defineOp((a: StitchEHForwardArgs) => {
  const op = 'stitchEHForward';
  const n = experts(op, a.experts);
  const h0 = f32(op, 'h0', a.h0);
  const { ND, scalars } = flatDims(op, 'h0', h0.length, n, 1);
  const p = f32(op, 'p', a.p, n * ND, 'experts*N*D');
  const gate = f32(op, 'gate', a.gate, (n + 1) * ND, 'N*D*(experts+1)');
  const out = outF32(op, 'out', a.out, ND, 'N*D');
  return { op: 'stitch_eh_forward', tensors: [h0, p, gate, out], scalars, result: { out } };
});
/** E->H stitch mix forward. Returns `{ out }`. */
export const stitchEHForward = ehFwd.sync;
/** {@link stitchEHForward} on the compute pool, off the event loop. */
export const stitchEHForwardAsync = ehFwd.async;

export interface StitchEHBackwardArgs {
  /** [N, D] forward hub state. */
  h0: Float32Array;
  /** [n, N, D] forward projected expert states. */
  p: Float32Array;
  /** [N, D*(n+1)] forward gate logits. */
  gate: Float32Array;
  /** [N, D] gradient of the new hub state. */
  dout: Float32Array;
  /** Number of experts n. */
  experts: number;
  /** [N, D] receives g_0 * dout (allocated if omitted; may be dout). */
  dh0?: Float32Array;
  /** [n, N, D] receives g_i * dout (allocated if omitted). */
  dp?: Float32Array;
  /** [N, D*(n+1)] receives the gradient of the logits (allocated if omitted). */
  dgate?: Float32Array;
}

const ehBwd = defineOp((a: StitchEHBackwardArgs) => {
  const op = 'stitchEHBackward';
  const n = experts(op, a.experts);
  const h0 = f32(op, 'h0', a.h0);
  const { ND, scalars } = flatDims(op, 'h0', h0.length, n, 1);
  const p = f32(op, 'p', a.p, n * ND, 'experts*N*D');
  const gate = f32(op, 'gate', a.gate, (n + 1) * ND, 'N*D*(experts+1)');
  const dout = f32(op, 'dout', a.dout, ND, 'N*D');
  const dh0 = outF32(op, 'dh0', a.dh0, ND, 'N*D');
  const dp = outF32(op, 'dp', a.dp, n * ND, 'experts*N*D');
  const dgate = outF32(op, 'dgate', a.dgate, (n + 1) * ND, 'N*D*(experts+1)');
  return { op: 'stitch_eh_backward', tensors: [h0, p, gate, dout, dh0, dp, dgate], scalars, result: { dh0, dp, dgate } };
});
/** E->H stitch mix backward. Returns `{ dh0, dp, dgate }`. */
export const stitchEHBackward = ehBwd.sync;
/** {@link stitchEHBackward}, async. */
export const stitchEHBackwardAsync = ehBwd.async;

export interface StitchHEForwardArgs {
  /** [n, N, D] expert states h_1..h_n. */
  h: Float32Array;
  /** [n, N, D] projected hub state per expert, q_i = W_proj_i h_0. */
  q: Float32Array;
  /** [N, D*(n+1)] gate logits (slot 0 of each dim unused). */
  gate: Float32Array;
  /** Number of experts n. */
  experts: number;
  /** [n, N, D] new expert states (allocated if omitted; may be h). */
  out?: Float32Array;
}

const heFwd = defineOp((a: StitchHEForwardArgs) => {
  const op = 'stitchHEForward';
  const n = experts(op, a.experts);
  const h = f32(op, 'h', a.h);
  const { ND, scalars } = flatDims(op, 'h', h.length, n, n);
  const q = f32(op, 'q', a.q, n * ND, 'experts*N*D');
  const gate = f32(op, 'gate', a.gate, (n + 1) * ND, 'N*D*(experts+1)');
  const out = outF32(op, 'out', a.out, n * ND, 'experts*N*D');
  return { op: 'stitch_he_forward', tensors: [h, q, gate, out], scalars, result: { out } };
});
/** H->E stitch mix forward. Returns `{ out }`. */
export const stitchHEForward = heFwd.sync;
/** {@link stitchHEForward} on the compute pool, off the event loop. */
export const stitchHEForwardAsync = heFwd.async;

export interface StitchHEBackwardArgs {
  /** [n, N, D] forward expert states. */
  h: Float32Array;
  /** [n, N, D] forward projected hub states. */
  q: Float32Array;
  /** [N, D*(n+1)] forward gate logits. */
  gate: Float32Array;
  /** [n, N, D] gradient of the new expert states. */
  dout: Float32Array;
  /** Number of experts n. */
  experts: number;
  /** [n, N, D] receives (1 - g_i) dout_i (allocated if omitted; may be dout). */
  dh?: Float32Array;
  /** [n, N, D] receives g_i dout_i (allocated if omitted). */
  dq?: Float32Array;
  /** [N, D*(n+1)] receives the gradient of the logits, slot 0 zero (allocated if omitted). */
  dgate?: Float32Array;
}

const heBwd = defineOp((a: StitchHEBackwardArgs) => {
  const op = 'stitchHEBackward';
  const n = experts(op, a.experts);
  const h = f32(op, 'h', a.h);
  const { ND, scalars } = flatDims(op, 'h', h.length, n, n);
  const q = f32(op, 'q', a.q, n * ND, 'experts*N*D');
  const gate = f32(op, 'gate', a.gate, (n + 1) * ND, 'N*D*(experts+1)');
  const dout = f32(op, 'dout', a.dout, n * ND, 'experts*N*D');
  const dh = outF32(op, 'dh', a.dh, n * ND, 'experts*N*D');
  const dq = outF32(op, 'dq', a.dq, n * ND, 'experts*N*D');
  const dgate = outF32(op, 'dgate', a.dgate, (n + 1) * ND, 'N*D*(experts+1)');
  return { op: 'stitch_he_backward', tensors: [h, q, gate, dout, dh, dq, dgate], scalars, result: { dh, dq, dgate } };
});
/** H->E stitch mix backward. Returns `{ dh, dq, dgate }`. */
export const stitchHEBackward = heBwd.sync;
/** {@link stitchHEBackward}, async. */
export const stitchHEBackwardAsync = heBwd.async;
