/**
 * Rotary position embeddings (RoPE), Hugging Face "rotate half" pairing: in every head of width
 * `headDim`, element i (< headDim/2) is rotated together with element i + headDim/2 by the angle
 * `pos * invFreq[i]`. {@link ropeTable} builds the cos/sin table once (as transformers does, in fp32,
 * with optional Llama 3 frequency scaling); {@link ropeForward} rotates rows of heads, optionally
 * strided (q and k inside a fused qkv buffer) and in place. The backward is `ropeForward` with
 * `inverse: true` (the rotation is orthogonal: dx = R^T dy).
 * Shapes: table [P, headDim/2, 2] (cos, sin), invFreq [headDim/2], x / out [N, heads, headDim] rows,
 * pos [N] in [0, P).
 */
import { ArgumentError, ShapeError } from '../errors.js';
import { defineOp, f32, i32, num, outF32, posInt } from './core.js';

/** Llama 3 frequency scaling (`rope_scaling` with `rope_type: "llama3"` in a Hugging Face config). */
export interface RopeLlama3Scaling {
  /** `factor`: low frequencies are divided by it (Llama 3.x: 8 or 32). */
  factor: number;
  /** `low_freq_factor` (Llama 3.x: 1). Default 1. */
  lowFreqFactor?: number;
  /** `high_freq_factor`, > lowFreqFactor (Llama 3.x: 4). Default 4. */
  highFreqFactor?: number;
  /** `original_max_position_embeddings` (Llama 3.x: 8192). Default 8192. */
  originalMaxPositionEmbeddings?: number;
}

export interface RopeTableArgs {
  /** Number of positions P the table covers (positions 0..P-1). */
  positions: number;
  /** Head dimension (even). */
  headDim: number;
  /** `rope_theta`, the frequency base. Default 10000. */
  theta?: number;
  /** Llama 3 scaling; omit (or null) for plain RoPE. */
  scaling?: RopeLlama3Scaling | null;
  /** [P, headDim/2, 2] output (allocated if omitted). */
  table?: Float32Array;
  /** [headDim/2] receives the inverse frequencies (allocated if omitted). */
  invFreq?: Float32Array;
}

function evenHeadDim(op: string, v: unknown): number {
  const Dh = posInt(op, 'headDim', v);
  if (Dh % 2 !== 0) throw new ArgumentError(`${op}: 'headDim' must be even, got ${Dh}`);
  return Dh;
}

const table = defineOp((a: RopeTableArgs) => {
  const op = 'ropeTable';
  const P = a.positions;
  if (typeof P !== 'number' || !Number.isInteger(P) || P < 0)
    throw new ArgumentError(`${op}: 'positions' must be a non-negative integer, got ${String(P)}`);
  const Dh = evenHeadDim(op, a.headDim);
  const theta = num(op, 'theta', a.theta, 10000);
  if (theta <= 0) throw new ArgumentError(`${op}: 'theta' must be > 0, got ${theta}`);
  const s = a.scaling ?? null;
  let factor = 0;
  let low = 1;
  let high = 4;
  let orig = 8192;
  if (s) {
    factor = num(op, 'scaling.factor', s.factor);
    if (factor <= 0) throw new ArgumentError(`${op}: 'scaling.factor' must be > 0, got ${factor}`);
    low = num(op, 'scaling.lowFreqFactor', s.lowFreqFactor, 1);
    high = num(op, 'scaling.highFreqFactor', s.highFreqFactor, 4);
    orig = num(op, 'scaling.originalMaxPositionEmbeddings', s.originalMaxPositionEmbeddings, 8192);
  }
  const tab = outF32(op, 'table', a.table, P * Dh, 'P*headDim');
  const invFreq = outF32(op, 'invFreq', a.invFreq, Dh / 2, 'headDim/2');
  return { op: 'rope_table', tensors: [tab, invFreq], scalars: [P, Dh, theta, factor, low, high, orig], result: { table: tab, invFreq } };
});
/** Builds the cos/sin table. Returns `{ table, invFreq }`. */
export const ropeTable = table.sync;
/** {@link ropeTable} on the compute pool, off the event loop. */
export const ropeTableAsync = table.async;

export interface RopeForwardArgs {
  /** [N, heads, headDim] rows, consecutive rows `ldX` floats apart. */
  x: Float32Array;
  /** [N] position of each row, in [0, P). */
  pos: Int32Array;
  /** [P, headDim/2, 2] from {@link ropeTable}. */
  table: Float32Array;
  /** Head dimension (even). */
  headDim: number;
  /** Heads per row. Default: x.length / (N * headDim) (x packed; required when ldX is given). */
  heads?: number;
  /** true: rotate by -angle (the backward pass, dx = R^T dy). Default false. */
  inverse?: boolean;
  /** Output rows (allocated packed [N, heads, headDim] if omitted; may be `x` itself for in place). */
  out?: Float32Array;
  /** Floats between the starts of consecutive rows of x, >= heads*headDim. Default heads*headDim. */
  ldX?: number;
  /** Floats between rows of out. Default: ldX when out is x, else heads*headDim. */
  ldOut?: number;
}

function stride(op: string, name: string, v: unknown, row: number): number {
  if (v === undefined) return row;
  const s = posInt(op, name, v);
  if (s < row) throw new ArgumentError(`${op}: '${name}' must be >= heads*headDim = ${row}, got ${s}`);
  return s;
}

const fwd = defineOp((a: RopeForwardArgs) => {
  const op = 'ropeForward';
  const Dh = evenHeadDim(op, a.headDim);
  const pos = i32(op, 'pos', a.pos);
  const N = pos.length;
  const x = f32(op, 'x', a.x);
  let nh: number;
  if (a.heads !== undefined) nh = posInt(op, 'heads', a.heads);
  else {
    if (a.ldX !== undefined) throw new ArgumentError(`${op}: 'heads' is required when 'ldX' is given`);
    if (N === 0 || x.length % (N * Dh) !== 0 || x.length === 0)
      throw new ShapeError(`${op}: argument 'x' has ${x.length} elements, not a positive multiple of N*headDim = ${N * Dh}; pass 'heads'`);
    nh = x.length / (N * Dh);
  }
  const row = nh * Dh;
  const ldX = stride(op, 'ldX', a.ldX, row);
  const needX = N === 0 ? 0 : (N - 1) * ldX + row;
  if (x.length < needX) throw new ShapeError(`${op}: argument 'x' has ${x.length} elements, expected at least (N-1)*ldX + heads*headDim = ${needX}`);
  const tab = f32(op, 'table', a.table);
  if (tab.length === 0 || tab.length % Dh !== 0)
    throw new ShapeError(`${op}: argument 'table' has ${tab.length} elements, expected a positive multiple of headDim = ${Dh} (P*headDim)`);
  const P = tab.length / Dh;
  const inPlace = a.out !== undefined && a.out === a.x;
  const ldOut = a.ldOut === undefined && inPlace ? ldX : stride(op, 'ldOut', a.ldOut, row);
  const needOut = N === 0 ? 0 : (N - 1) * ldOut + row;
  let out: Float32Array;
  if (a.out === undefined || a.out === null) out = new Float32Array(needOut);
  else {
    out = f32(op, 'out', a.out);
    if (out.length < needOut)
      throw new ShapeError(`${op}: argument 'out' has ${out.length} elements, expected at least (N-1)*ldOut + heads*headDim = ${needOut}`);
  }
  if (inPlace && ldOut !== ldX) throw new ArgumentError(`${op}: in place ('out' is 'x') needs ldOut == ldX`);
  const inverse = a.inverse ?? false;
  if (typeof inverse !== 'boolean') throw new ArgumentError(`${op}: 'inverse' must be a boolean`);
  return { op: 'rope_forward', tensors: [x, pos, tab, out], scalars: [N, nh, Dh, P, inverse, ldX, ldOut], result: { out } };
});
/** Rotates every head of every row by its position's angles. Returns `{ out }`. */
export const ropeForward = fwd.sync;
/** {@link ropeForward} on the compute pool, off the event loop. */
export const ropeForwardAsync = fwd.async;
