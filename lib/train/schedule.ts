/**
 * Learning-rate schedule: linear warmup, then cosine (or linear) decay to a floor, constant after.
 * A pure function of the optimizer step, so a resumed run needs nothing but the step count.
 *
 * With P = peakLr, W = warmupSteps, S = totalSteps, m = minLrRatio * P and `step` 0-based:
 *   step <  W:       P * (step + 1) / W              (P/W at step 0, P at step W-1)
 *   W <= step < S:   q = (step - W) / (S - W), in [0, 1)
 *                    cosine:   m + (P - m) * (1 + cos(pi q)) / 2
 *                    linear:   P - (P - m) q
 *                    constant: P
 *   step >= S:       m (constant: P)
 * Warmup starts at P/W rather than 0 (HF's `get_cosine_schedule_with_warmup` gives 0 at step 0, a
 * wasted step): our step s uses HF's value at s + 1 during warmup. The decay reaches exactly m at
 * step S, the first step after the run, so the last step of a run of S steps is just above m.
 *
 * Defaults: minLrRatio 0.1 (a common small-scale choice). METHOD.md's recipe (the paper's) decays
 * to 1% of the peak: pass minLrRatio 0.01 for stitch training.
 */
import { ArgumentError } from '../errors.js';

/** Parameters of {@link learningRate}. */
export interface LrSchedule {
  /** Largest learning rate, reached at the end of warmup. Finite, > 0. */
  peakLr: number;
  /** Linear warmup length in optimizer steps, integer >= 0 (0 = start at the peak). */
  warmupSteps: number;
  /** Step at which the decay ends, integer >= warmupSteps (and >= 1). */
  totalSteps: number;
  /** Floor as a fraction of peakLr, in [0, 1]. Default 0.1; METHOD.md (stitch training) uses 0.01. */
  minLrRatio?: number;
  /** Decay shape after warmup. Default 'cosine'. */
  kind?: 'cosine' | 'linear' | 'constant';
}

/** Default {@link LrSchedule.minLrRatio}. */
export const DEFAULT_MIN_LR_RATIO = 0.1;

/**
 * Checks a schedule; throws an ArgumentError naming the offending field, its expected range and value.
 * @returns the schedule with defaults filled in.
 */
export function validateSchedule(s: LrSchedule): Required<LrSchedule> {
  if (s === null || typeof s !== 'object') throw new ArgumentError(`LrSchedule must be an object, got ${s === null ? 'null' : typeof s}`);
  const bad = (field: string, want: string, v: unknown): never => {
    throw new ArgumentError(`LrSchedule.${field} must be ${want}, got ${typeof v === 'number' ? v : JSON.stringify(v)}`);
  };
  if (typeof s.peakLr !== 'number' || !Number.isFinite(s.peakLr) || s.peakLr <= 0) bad('peakLr', 'a finite number > 0', s.peakLr);
  if (!Number.isSafeInteger(s.warmupSteps) || s.warmupSteps < 0) bad('warmupSteps', 'an integer >= 0', s.warmupSteps);
  if (!Number.isSafeInteger(s.totalSteps) || s.totalSteps < Math.max(1, s.warmupSteps)) bad('totalSteps', `an integer >= max(1, warmupSteps = ${s.warmupSteps})`, s.totalSteps);
  const minLrRatio = s.minLrRatio ?? DEFAULT_MIN_LR_RATIO;
  if (typeof minLrRatio !== 'number' || !(minLrRatio >= 0 && minLrRatio <= 1)) bad('minLrRatio', 'a number in [0, 1]', s.minLrRatio);
  const kind = s.kind ?? 'cosine';
  if (kind !== 'cosine' && kind !== 'linear' && kind !== 'constant') bad('kind', "'cosine', 'linear' or 'constant'", s.kind);
  return { peakLr: s.peakLr, warmupSteps: s.warmupSteps, totalSteps: s.totalSteps, minLrRatio, kind };
}

/**
 * The learning rate of optimizer step `step` (0-based) under schedule `s` (see the file comment for
 * the formulas). Throws an ArgumentError for an invalid schedule or a step that is not an integer >= 0.
 */
export function learningRate(s: LrSchedule, step: number): number {
  const { peakLr: P, warmupSteps: W, totalSteps: S, minLrRatio, kind } = validateSchedule(s);
  if (!Number.isSafeInteger(step) || step < 0) throw new ArgumentError(`learningRate: step must be an integer >= 0, got ${step}`);
  if (step < W) return (P * (step + 1)) / W;
  if (kind === 'constant') return P;
  const m = minLrRatio * P;
  if (step >= S) return m;
  const q = (step - W) / (S - W);
  if (kind === 'linear') return P - (P - m) * q;
  return m + ((P - m) * (1 + Math.cos(Math.PI * q))) / 2;
}
