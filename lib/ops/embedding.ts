/**
 * Embedding lookup: `out[n] = table[ids[n]]`, and its backward `dtable[ids[n]] += dout[n]`.
 * Shapes: ids [N] (Int32Array), table [V, D], out [N, D], dout [N, D], dtable [V, D]; D = `dim`,
 * V = table.length / dim. Every id is checked: one outside [0, V) throws a TokenRangeError naming its
 * position and value, before anything is read or written. The backward accumulates (+=) and is
 * deterministic (rows of one token are added in order, whatever the thread count).
 */
import { ShapeError } from '../errors.js';
import { defineOp, f32, i32, outF32, posInt, rows } from './core.js';

export interface EmbeddingForwardArgs {
  /** [N] token ids in [0, V). */
  ids: Int32Array;
  /** [V, D] embedding table. */
  table: Float32Array;
  /** D, the embedding width (floats per row). */
  dim: number;
  /** [N, D] output (allocated if omitted). */
  out?: Float32Array;
}

const fwd = defineOp((a: EmbeddingForwardArgs) => {
  const op = 'embeddingForward';
  const D = posInt(op, 'dim', a.dim);
  const ids = i32(op, 'ids', a.ids);
  const table = f32(op, 'table', a.table);
  const V = rows(op, 'table', table.length, D, 'dim');
  if (V === 0) throw new ShapeError(`${op}: argument 'table' is empty`);
  const N = ids.length;
  const out = outF32(op, 'out', a.out, N * D, 'N*D');
  return { op: 'embedding_forward', tensors: [ids, table, out], scalars: [N, V, D], result: { out } };
});
/** Embedding forward. Returns `{ out }`. */
export const embeddingForward = fwd.sync;
/** Embedding forward on the compute pool, off the event loop. */
export const embeddingForwardAsync = fwd.async;

export interface EmbeddingBackwardArgs {
  /** [N] token ids in [0, V) (those of the forward). */
  ids: Int32Array;
  /** [N, D] gradient of the output. */
  dout: Float32Array;
  /** [V, D] table gradient, accumulated into (+=). Its length gives V. */
  dtable: Float32Array;
  /** D, the embedding width. */
  dim: number;
}

const bwd = defineOp((a: EmbeddingBackwardArgs) => {
  const op = 'embeddingBackward';
  const D = posInt(op, 'dim', a.dim);
  const ids = i32(op, 'ids', a.ids);
  const N = ids.length;
  const dout = f32(op, 'dout', a.dout, N * D, 'N*D');
  const dtable = f32(op, 'dtable', a.dtable);
  const V = rows(op, 'dtable', dtable.length, D, 'dim');
  if (V === 0) throw new ShapeError(`${op}: argument 'dtable' is empty`);
  return { op: 'embedding_backward', tensors: [ids, dout, dtable], scalars: [N, V, D], result: { dtable } };
});
/** Embedding backward (scatter-add). Returns `{ dtable }`. */
export const embeddingBackward = bwd.sync;
/** Embedding backward, async. */
export const embeddingBackwardAsync = bwd.async;
