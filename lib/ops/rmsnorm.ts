/**
 * RMSNorm (Llama): `out = x / sqrt(mean(x^2) + eps) * weight`, over the last dimension D = weight.length.
 * Shapes: x [N, D], weight [D], out [N, D], rstd [N]. Backward: dx overwritten, dweight accumulated (+=).
 */
import { defineOp, f32, num, outF32, rows } from './core.js';

export interface RmsNormForwardArgs {
  /** [N, D] input rows. */
  x: Float32Array;
  /** [D] gain. */
  weight: Float32Array;
  /** Added to the mean square. Default 1e-5. */
  eps?: number;
  /** [N, D] output (allocated if omitted; may be `x` itself). */
  out?: Float32Array;
  /** [N] receives 1/sqrt(mean(x^2)+eps) for the backward (allocated if omitted). */
  rstd?: Float32Array;
}

const fwd = defineOp((a: RmsNormForwardArgs) => {
  const op = 'rmsnormForward';
  const w = f32(op, 'weight', a.weight);
  const D = w.length;
  const x = f32(op, 'x', a.x);
  const N = rows(op, 'x', x.length, D, 'D');
  const out = outF32(op, 'out', a.out, N * D, 'N*D');
  const rstd = outF32(op, 'rstd', a.rstd, N, 'N');
  return { op: 'rmsnorm_forward', tensors: [x, w, out, rstd], scalars: [N, D, num(op, 'eps', a.eps, 1e-5)], result: { out, rstd } };
});
/** RMSNorm forward. Returns `{ out, rstd }`. */
export const rmsnormForward = fwd.sync;
/** RMSNorm forward on the compute pool, off the event loop. */
export const rmsnormForwardAsync = fwd.async;

export interface RmsNormBackwardArgs {
  /** [N, D] forward input. */
  x: Float32Array;
  /** [D] gain. */
  weight: Float32Array;
  /** [N] from the forward. */
  rstd: Float32Array;
  /** [N, D] gradient of the output. */
  dout: Float32Array;
  /** [N, D] receives the input gradient (allocated if omitted). */
  dx?: Float32Array;
  /** [D] weight gradient, accumulated into (+=); omit for a frozen weight. */
  dweight?: Float32Array | null;
}

const bwd = defineOp((a: RmsNormBackwardArgs) => {
  const op = 'rmsnormBackward';
  const w = f32(op, 'weight', a.weight);
  const D = w.length;
  const x = f32(op, 'x', a.x);
  const N = rows(op, 'x', x.length, D, 'D');
  const rstd = f32(op, 'rstd', a.rstd, N, 'N');
  const dout = f32(op, 'dout', a.dout, N * D, 'N*D');
  const dx = outF32(op, 'dx', a.dx, N * D, 'N*D');
  const dweight = a.dweight == null ? null : f32(op, 'dweight', a.dweight, D, 'D');
  return { op: 'rmsnorm_backward', tensors: [x, w, rstd, dout, dx, dweight], scalars: [N, D], result: { dx, dweight } };
});
/** RMSNorm backward. Returns `{ dx, dweight }`. */
export const rmsnormBackward = bwd.sync;
/** RMSNorm backward, async. */
export const rmsnormBackwardAsync = bwd.async;
