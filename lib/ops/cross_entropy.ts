/**
 * Softmax cross-entropy fused with the LM head: `logits = x weight^T`, `loss_n = logsumexp(logits_n) -
 * logits_n[targets_n]`, computed vocabulary chunk by chunk so that no [N, V] logits matrix is ever
 * materialised, with the backward of `L = gradScale * sum_n loss_n` in the same call.
 *
 * Shapes: x [N, D] (final hidden states), weight [V, D] (LM head or tied embedding), targets [N]
 * (Int32Array); N = targets.length, D = x.length / N, V = weight.length / D. Rows whose target equals
 * `ignoreIndex` count for nothing (loss 0, zero gradient). A target outside [0, V) that is not
 * `ignoreIndex` throws a TokenRangeError naming its position and value.
 * Backward: dx [N, D] is overwritten; dweight [V, D] is accumulated (+=), or skipped for a frozen head.
 */
import { ArgumentError, ShapeError } from '../errors.js';
import { defineOp, f32, i32, num, outF32, rows } from './core.js';

export interface CrossEntropyArgs {
  /** [N, D] hidden states (after the final norm). */
  x: Float32Array;
  /** [V, D] LM-head weight ([out, in], as Hugging Face). */
  weight: Float32Array;
  /** [N] target token ids in [0, V), or `ignoreIndex`. */
  targets: Int32Array;
  /** Targets equal to this are ignored (integer). Default -100 (as PyTorch). */
  ignoreIndex?: number;
  /**
   * dL/dloss_n for every counted row: the backward computes the gradient of gradScale * sum_n loss_n.
   * Default 1 (gradient of the sum). For the gradient of the mean pass 1 / count (count of the
   * non-ignored targets, which the caller can compute up front).
   */
  gradScale?: number;
  /** Run the backward: dx is allocated if not given. Default: true when dx or dweight is given. */
  backward?: boolean;
  /** [N, D] receives dL/dx (overwritten). Implies backward. */
  dx?: Float32Array;
  /** [V, D] dL/dweight accumulated into (+=); omit or null for a frozen head. Needs the backward. */
  dweight?: Float32Array | null;
  /** [N] receives the per-row losses (0 for ignored rows); allocated if omitted. */
  losses?: Float32Array;
  /** Tuning (results differ only by rounding): vocab rows per chunk, 0 = automatic. Default 0. */
  vocabChunk?: number;
  /** Tuning: rows of x per block, 0 = automatic. Default 0. */
  rowBlock?: number;
}

export interface CrossEntropyResult {
  /** Mean loss over the counted (non-ignored) rows, lossSum / count; NaN when count is 0. */
  loss: number;
  /** Sum of the per-row losses (accumulated in double). */
  lossSum: number;
  /** Number of rows whose target is not ignoreIndex. */
  count: number;
  /** [N] per-row losses. */
  losses: Float32Array;
  /** [N, D] input gradient (with the backward). */
  dx?: Float32Array;
  /** [V, D] the weight gradient buffer given (with the backward). */
  dweight?: Float32Array;
}

function nonNegInt(op: string, name: string, v: unknown, dflt: number): number {
  const x = v === undefined ? dflt : v;
  if (typeof x !== 'number' || !Number.isInteger(x) || x < 0)
    throw new ArgumentError(`${op}: '${name}' must be an integer >= 0, got ${String(v)}`);
  return x;
}

const ce = defineOp((a: CrossEntropyArgs) => {
  const op = 'crossEntropy';
  const targets = i32(op, 'targets', a.targets);
  const N = targets.length;
  if (N === 0) throw new ShapeError(`${op}: argument 'targets' is empty (need at least one row)`);
  const x = f32(op, 'x', a.x);
  const D = rows(op, 'x', x.length, N, 'targets.length');
  if (D === 0) throw new ShapeError(`${op}: argument 'x' is empty`);
  const weight = f32(op, 'weight', a.weight);
  const V = rows(op, 'weight', weight.length, D, 'D (= x.length / targets.length)');
  if (V === 0) throw new ShapeError(`${op}: argument 'weight' is empty`);
  const ignoreIndex = a.ignoreIndex === undefined ? -100 : a.ignoreIndex;
  if (!Number.isInteger(ignoreIndex) || ignoreIndex < -(2 ** 31) || ignoreIndex >= 2 ** 31)
    throw new ArgumentError(`${op}: 'ignoreIndex' must be a 32-bit integer, got ${String(a.ignoreIndex)}`);
  const gradScale = num(op, 'gradScale', a.gradScale, 1);
  const hasDw = a.dweight !== undefined && a.dweight !== null;
  if (a.backward === false && (a.dx !== undefined || hasDw))
    throw new ArgumentError(`${op}: 'backward' is false but 'dx' or 'dweight' was given`);
  const backward = a.backward ?? (a.dx !== undefined || hasDw);
  const dx = backward ? outF32(op, 'dx', a.dx, N * D, 'N*D') : null;
  const dweight = backward && hasDw ? f32(op, 'dweight', a.dweight, V * D, 'V*D') : null;
  const losses = outF32(op, 'losses', a.losses, N, 'N');
  const lossSum = new Float64Array(1);
  const count = new BigInt64Array(1);
  const scalars = [N, D, V, ignoreIndex, gradScale, nonNegInt(op, 'vocabChunk', a.vocabChunk, 0), nonNegInt(op, 'rowBlock', a.rowBlock, 0)];
  // The sums are written by the native call, after prepare returns: read them lazily.
  const result = { losses } as CrossEntropyResult;
  Object.defineProperties(result, {
    lossSum: { enumerable: true, get: () => lossSum[0] },
    count: { enumerable: true, get: () => Number(count[0]) },
    loss: { enumerable: true, get: () => (count[0] === 0n ? NaN : lossSum[0] / Number(count[0])) },
  });
  if (dx) result.dx = dx;
  if (dweight) result.dweight = dweight;
  return { op: 'cross_entropy', tensors: [x, weight, targets, losses, lossSum, count, dx, dweight], scalars, result };
});
/** Fused LM-head cross-entropy (forward, and backward when asked). Returns {@link CrossEntropyResult}. */
export const crossEntropy = ce.sync;
/** Fused LM-head cross-entropy on the compute pool, off the event loop. */
export const crossEntropyAsync = ce.async;
