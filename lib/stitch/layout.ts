/**
 * The layout of a stitched model's trainable part (docs/FORMAT.md; ../shared/METHOD.md): where the K
 * stitch layers sit, which type each one is, what its tensors are called and how many parameters
 * they hold. Pure functions of the sizes, shared by the model layer, the trainer, the CLI and the
 * tests, so that the paper's parameter layout is written down once.
 *
 * Layout (per stitch k = 0..K-1, in placement order; n experts, M = n + 1 models, model 0 the hub):
 * - `stitch.{k}.proj.{e}.weight` [D, D] for e = 0..n-1 (expert e is "model e+1"), Linear layout
 *   [out, in]: p = h W^T;
 * - `stitch.{k}.gate.weight` [D*M, D], Linear layout: G = h_0 W^T, and row r = d*M + m holds the
 *   logit of model m at hidden dim d (so G of one token reshapes to [D, M], model fastest).
 * Both stitch types (E->H and H->E) carry the same tensors; an H->E gate never reads its rows with
 * m = 0, but they are part of the layout (the paper counts them: (n+1)*D^2 per gate).
 *
 * Placement: K stitches, one after every L/K blocks, the last right after block L; "after block j"
 * counts blocks from 1. When K does not divide L the stitch k (1-based) goes after block
 * floor(k*L/K), which spaces them as evenly as integers allow and still ends at L. Types alternate
 * and the last is E->H (built backwards); pattern 'all-eh' makes every stitch E->H.
 *
 * Known limits: sizes are JavaScript numbers; a count above 2^53 - 1 is refused rather than rounded.
 */
import { ArgumentError } from '../errors.js';

/** Stitch type: `'eh'` experts-into-hub (softmax gate), `'he'` hub-into-experts (sigmoid gate). */
export type StitchType = 'eh' | 'he';

/** How the types of the K stitches are chosen: alternating ending with E->H, or all E->H. */
export type StitchPattern = 'alternating' | 'all-eh';

/** Where one stitch sits and what it does. */
export interface StitchSpec {
  /** The stitch reads the residual streams after this block, counted from 1 (1..L). */
  afterBlock: number;
  /** E->H (`'eh'`) or H->E (`'he'`). */
  type: StitchType;
}

/** One trainable tensor of a stitched model. */
export interface StitchTensorSpec {
  /** safetensors name, e.g. `stitch.0.proj.1.weight` or `stitch.0.gate.weight`. */
  name: string;
  /** [D, D] for a projection, [D*(n+1), D] for a gate ([out, in] Linear layout). */
  shape: [number, number];
  /** Stitch index k (0-based, placement order). */
  stitch: number;
  /** `'proj'` (W_proj of one expert) or `'gate'` (W_gate). */
  kind: 'proj' | 'gate';
  /** Expert index e (0-based; model e+1) for a projection; absent for a gate. */
  expert?: number;
}

function posInt(fn: string, name: string, v: unknown): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1)
    throw new ArgumentError(`${fn}: '${name}' must be an integer >= 1, got ${String(v)}`);
  return v;
}

/**
 * The K stitch positions and types for an L-block model: stitch k (1-based) after block
 * floor(k*L/K), so K = L/K-spaced stitches when K divides L and always one right after block L.
 * `'alternating'` (default) builds the types backwards from the last, which is E->H
 * (L=20, K=4: after 5, 10, 15, 20 = he, eh, he, eh; K=1: one eh after block L); `'all-eh'` makes
 * every stitch E->H. Throws ArgumentError unless 1 <= K <= L.
 */
export function stitchPlacement(L: number, K: number, pattern: StitchPattern = 'alternating'): StitchSpec[] {
  const fn = 'stitchPlacement';
  posInt(fn, 'L', L);
  posInt(fn, 'K', K);
  if (K > L) throw new ArgumentError(`${fn}: 'K' (${K} stitches) must be <= 'L' (${L} blocks): at most one stitch after each block`);
  if (pattern !== 'alternating' && pattern !== 'all-eh')
    throw new ArgumentError(`${fn}: 'pattern' must be 'alternating' or 'all-eh', got ${JSON.stringify(pattern)}`);
  const out: StitchSpec[] = [];
  for (let k = 1; k <= K; k++) {
    const afterBlock = Math.floor((k * L) / K); // exact: k*L <= L^2 is a safe integer for any real L
    const fromLast = K - k; // 0 for the last stitch
    out.push({ afterBlock, type: pattern === 'all-eh' || fromLast % 2 === 0 ? 'eh' : 'he' });
  }
  return out;
}

/**
 * Checks a placement read from a manifest against a model of L blocks: at least one stitch, every
 * `afterBlock` an integer in 1..L, strictly increasing (one stitch per position at most), every type
 * `'eh'` or `'he'`. Any such placement is valid in the format; {@link stitchPlacement} is only the
 * package's rule for making one. Throws ArgumentError naming `where` (e.g. the manifest file) and the
 * offending entry.
 */
export function checkStitchPlacement(placement: readonly StitchSpec[], L: number, where = 'placement'): void {
  posInt('checkStitchPlacement', 'L', L);
  if (!Array.isArray(placement) || placement.length === 0)
    throw new ArgumentError(`${where}: 'stitches' must be a non-empty array, got ${JSON.stringify(placement)}`);
  let prev = 0;
  placement.forEach((s, k) => {
    const j = s?.afterBlock;
    if (typeof j !== 'number' || !Number.isInteger(j) || j < 1 || j > L)
      throw new ArgumentError(`${where}: stitches[${k}].afterBlock must be an integer in 1..${L}, got ${JSON.stringify(j)}`);
    if (j <= prev) throw new ArgumentError(`${where}: stitches[${k}].afterBlock ${j} must be greater than the previous one (${prev})`);
    if (s.type !== 'eh' && s.type !== 'he') throw new ArgumentError(`${where}: stitches[${k}].type must be 'eh' or 'he', got ${JSON.stringify(s.type)}`);
    prev = j;
  });
}

/**
 * Trainable parameters of K stitches between a hub and n experts of width D:
 * K * (n*D^2 + (n+1)*D^2) (n projections [D, D] and a gate [D*(n+1), D] per stitch, no biases).
 * The paper's 2.7B setting (D 3072, n 3, K 4) gives 264,241,152. Throws ArgumentError for
 * non-positive or non-integer sizes, or a count beyond 2^53 - 1.
 */
export function stitchParamCount(D: number, n: number, K: number): number {
  const fn = 'stitchParamCount';
  posInt(fn, 'D', D);
  posInt(fn, 'n', n);
  posInt(fn, 'K', K);
  const count = K * (2 * n + 1) * D * D;
  if (!Number.isSafeInteger(count)) throw new ArgumentError(`${fn}: the count for D ${D}, n ${n}, K ${K} exceeds 2^53 - 1`);
  return count;
}

/** Name of stitch k's projection for expert e (both 0-based): `stitch.{k}.proj.{e}.weight`. */
export function stitchProjName(k: number, e: number): string {
  return `stitch.${k}.proj.${e}.weight`;
}

/** Name of stitch k's gate (0-based): `stitch.{k}.gate.weight`. */
export function stitchGateName(k: number): string {
  return `stitch.${k}.gate.weight`;
}

/**
 * Row of a gate weight [D*(n+1), D] (equivalently, column of the logits G [N, D*(n+1)]) holding model
 * m's logit at hidden dim d: d*(n+1) + m (m = 0 the hub, m = e+1 expert e).
 */
export function gateRow(d: number, m: number, n: number): number {
  return d * (n + 1) + m;
}

/**
 * Every trainable tensor of a stitched model, in file order: for each stitch k, the n projections
 * (e = 0..n-1), then the gate. `placement` (one entry per stitch, e.g. from {@link stitchPlacement})
 * or a stitch count K; types do not change the tensors. Throws ArgumentError for bad sizes.
 */
export function stitchTensorNames(D: number, n: number, placement: readonly StitchSpec[] | number): StitchTensorSpec[] {
  const fn = 'stitchTensorNames';
  posInt(fn, 'D', D);
  posInt(fn, 'n', n);
  const K = typeof placement === 'number' ? posInt(fn, 'placement', placement) : Array.isArray(placement) ? placement.length : NaN;
  if (!(K >= 1)) throw new ArgumentError(`${fn}: 'placement' must be a non-empty array of stitches or a count >= 1, got ${JSON.stringify(placement)}`);
  stitchParamCount(D, n, K); // size check
  const out: StitchTensorSpec[] = [];
  for (let k = 0; k < K; k++) {
    for (let e = 0; e < n; e++) out.push({ name: stitchProjName(k, e), shape: [D, D], stitch: k, kind: 'proj', expert: e });
    out.push({ name: stitchGateName(k), shape: [D * (n + 1), D], stitch: k, kind: 'gate' });
  }
  return out;
}
