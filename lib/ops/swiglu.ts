/**
 * SwiGLU, the Llama MLP's activation: `h = silu(gate) * up`, `silu(z) = z * sigmoid(z)`, element-wise.
 * gate, up and h are [N, F] (any matching length: the op is element-wise, so it takes them flat).
 * Backward: `dgate = dh * up * s (1 + gate (1 - s))` with `s = sigmoid(gate)`, `dup = dh * silu(gate)`;
 * both overwritten.
 */
import { defineOp, f32, outF32 } from './core.js';

export interface SwigluForwardArgs {
  /** [N, F] gate projection (the silu input). */
  gate: Float32Array;
  /** [N, F] up projection, same length as gate. */
  up: Float32Array;
  /** [N, F] output (allocated if omitted; may be gate or up). */
  h?: Float32Array;
}

const fwd = defineOp((a: SwigluForwardArgs) => {
  const op = 'swigluForward';
  const gate = f32(op, 'gate', a.gate);
  const len = gate.length;
  const up = f32(op, 'up', a.up, len, 'gate.length');
  const h = outF32(op, 'h', a.h, len, 'gate.length');
  // Element-wise: one row of `len` (N = 0 with a dummy width for empty inputs).
  return { op: 'swiglu_forward', tensors: [gate, up, h], scalars: [len > 0 ? 1 : 0, Math.max(len, 1)], result: { h } };
});
/** SwiGLU forward. Returns `{ h }`. */
export const swigluForward = fwd.sync;
/** SwiGLU forward on the compute pool, off the event loop. */
export const swigluForwardAsync = fwd.async;

export interface SwigluBackwardArgs {
  /** [N, F] forward gate input. */
  gate: Float32Array;
  /** [N, F] forward up input. */
  up: Float32Array;
  /** [N, F] gradient of h. */
  dh: Float32Array;
  /** [N, F] receives d/dgate (allocated if omitted; overwritten). */
  dgate?: Float32Array;
  /** [N, F] receives d/dup (allocated if omitted; overwritten). */
  dup?: Float32Array;
}

const bwd = defineOp((a: SwigluBackwardArgs) => {
  const op = 'swigluBackward';
  const gate = f32(op, 'gate', a.gate);
  const len = gate.length;
  const up = f32(op, 'up', a.up, len, 'gate.length');
  const dh = f32(op, 'dh', a.dh, len, 'gate.length');
  const dgate = outF32(op, 'dgate', a.dgate, len, 'gate.length');
  const dup = outF32(op, 'dup', a.dup, len, 'gate.length');
  return { op: 'swiglu_backward', tensors: [gate, up, dh, dgate, dup], scalars: [len > 0 ? 1 : 0, Math.max(len, 1)], result: { dgate, dup } };
});
/** SwiGLU backward. Returns `{ dgate, dup }`. */
export const swigluBackward = bwd.sync;
/** SwiGLU backward, async. */
export const swigluBackwardAsync = bwd.async;
