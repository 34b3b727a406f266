/**
 * AdamW over one flat parameter buffer, fused with global gradient-norm clipping (decoupled weight
 * decay, bias-corrected moments; the update of torch.optim.AdamW):
 *
 *     g = gradScale * grads * clip,   clip = min(1, maxGradNorm / ||gradScale * grads||)  (maxGradNorm > 0)
 *     m = beta1 m + (1 - beta1) g;    v = beta2 v + (1 - beta2) g^2
 *     params -= lr * (m / (1 - beta1^step) / (sqrt(v / (1 - beta2^step)) + eps) + weightDecay * params)
 *
 * Only elements [0, nDecay) get weight decay (lay out matrices first, norms and biases after).
 * params, m and v are updated in place; grads is not modified. All buffers are [n] Float32Array.
 */
import { ArgumentError } from '../errors.js';
import { defineOp, f32, num } from './core.js';

export interface AdamWStepArgs {
  /** [n] parameters, updated in place. */
  params: Float32Array;
  /** [n] gradients (read only). */
  grads: Float32Array;
  /** [n] first moment, updated in place (start from zeros). */
  m: Float32Array;
  /** [n] second moment, updated in place (start from zeros). */
  v: Float32Array;
  /** Learning rate, >= 0. */
  lr: number;
  /** First-moment decay in [0, 1). Default 0.9. */
  beta1?: number;
  /** Second-moment decay in [0, 1). Default 0.999. */
  beta2?: number;
  /** Added to sqrt(v_hat), > 0. Default 1e-8. */
  eps?: number;
  /** Decoupled weight decay coefficient (per unit of lr), >= 0. Default 0. */
  weightDecay?: number;
  /** Elements [0, nDecay) are decayed, [nDecay, n) are not. Integer in [0, n]. Default n (all). */
  nDecay?: number;
  /** 1-based step number t for the bias corrections 1 - beta^t (integer >= 1). */
  step: number;
  /** Clip the global norm of gradScale * grads to this value; <= 0 disables clipping. Default 0. */
  maxGradNorm?: number;
  /** Multiplies grads before everything (e.g. 1 / accumulation steps). Default 1. */
  gradScale?: number;
}

export interface AdamWStepResult {
  /**
   * ||gradScale * grads||, the global L2 norm before clipping (NaN or Infinity when the gradient is not
   * finite: check it to detect a diverged step). Always computed (one extra read of grads).
   */
  gradNorm: number;
}

const step = defineOp((a: AdamWStepArgs) => {
  const op = 'adamwStep';
  const params = f32(op, 'params', a.params);
  const n = params.length;
  const grads = f32(op, 'grads', a.grads, n, 'params.length');
  const m = f32(op, 'm', a.m, n, 'params.length');
  const v = f32(op, 'v', a.v, n, 'params.length');
  const nDecay = a.nDecay === undefined ? n : a.nDecay;
  if (typeof nDecay !== 'number' || !Number.isInteger(nDecay) || nDecay < 0 || nDecay > n)
    throw new ArgumentError(`${op}: 'nDecay' must be an integer in [0, ${n}], got ${String(a.nDecay)}`);
  const t = a.step;
  if (typeof t !== 'number' || !Number.isInteger(t) || t < 1)
    throw new ArgumentError(`${op}: 'step' must be an integer >= 1, got ${String(t)}`);
  const gradNorm = new Float32Array(1);
  const scalars = [
    n,
    nDecay,
    num(op, 'lr', a.lr),
    num(op, 'beta1', a.beta1, 0.9),
    num(op, 'beta2', a.beta2, 0.999),
    num(op, 'eps', a.eps, 1e-8),
    num(op, 'weightDecay', a.weightDecay, 0),
    t,
    num(op, 'maxGradNorm', a.maxGradNorm, 0),
    num(op, 'gradScale', a.gradScale, 1),
  ];
  // The norm is written by the native call, after prepare returns: read it lazily.
  const result = {} as AdamWStepResult;
  Object.defineProperty(result, 'gradNorm', { enumerable: true, get: () => gradNorm[0] });
  return { op: 'adamw_step', tensors: [params, grads, m, v, gradNorm], scalars, result };
});
/** One AdamW step, in place. Returns `{ gradNorm }`. */
export const adamwStep = step.sync;
/** One AdamW step on the compute pool, off the event loop. Do not touch the buffers until it resolves. */
export const adamwStepAsync = step.async;
