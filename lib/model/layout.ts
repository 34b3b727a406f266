/**
 * The flat parameter layout of a trainable Llama: every weight is a view into ONE Float32Array, and
 * the gradients and the two AdamW moments are Float32Arrays of the same layout. One buffer makes the
 * optimizer a single fused native call (ops.adamwStep over the whole model, with the global
 * gradient-norm clipping computed in the same pass) and a checkpoint four plain arrays.
 *
 * Order: the matrices (embedding, per-layer q/k/v/o/gate/up/down, LM head) first, then the 1-D
 * RMSNorm weights, so that `[0, nDecay)` is exactly what AdamW decays (the usual rule: decay matrices
 * and embeddings, never norm gains). Within each group: the order of llamaTensorNames().
 */
import { llamaTensorNames, type LlamaConfig } from '../formats/hf-config.js';

/** Where one weight lives in the flat buffer. */
export interface ParamSlot {
  /** HF tensor name. */
  name: string;
  /** HF shape ([out, in] for Linear weights). */
  shape: number[];
  /** Offset in elements. */
  offset: number;
  /** Element count. */
  length: number;
  /** True for matrices (weight-decayed), false for norm gains. */
  decay: boolean;
}

/** The flat layout of one model. */
export interface ParamLayout {
  slots: ParamSlot[];
  byName: Map<string, ParamSlot>;
  /** Total elements. */
  size: number;
  /** Elements [0, nDecay) are decayed (all matrices). */
  nDecay: number;
}

/** Computes the flat layout of a Llama config (see the file comment for the order). */
export function llamaLayout(config: LlamaConfig): ParamLayout {
  const specs = llamaTensorNames(config);
  const mats = specs.filter((s) => s.shape.length === 2);
  const vecs = specs.filter((s) => s.shape.length !== 2);
  const slots: ParamSlot[] = [];
  let offset = 0;
  for (const s of [...mats, ...vecs]) {
    const length = s.shape.reduce((a, b) => a * b, 1);
    slots.push({ name: s.name, shape: s.shape, offset, length, decay: s.shape.length === 2 });
    offset += length;
  }
  const nDecay = mats.reduce((a, s) => a + s.shape.reduce((x, y) => x * y, 1), 0);
  return { slots, byName: new Map(slots.map((s) => [s.name, s])), size: offset, nDecay };
}

/** Views of every slot of `buf` by name. */
export function viewsOf(layout: ParamLayout, buf: Float32Array): Record<string, Float32Array> {
  const out: Record<string, Float32Array> = {};
  for (const s of layout.slots) out[s.name] = buf.subarray(s.offset, s.offset + s.length);
  return out;
}

/** True for the matrices inside the decoder blocks (the ones bf16 mixed precision keeps in bf16). */
export function isBlockMatrix(name: string): boolean {
  return name.startsWith('model.layers.') && (name.includes('_proj.'));
}

/** Number of parameters of a config (tied head counted once). */
export function llamaParamCount(config: LlamaConfig): number {
  return llamaLayout(config).size;
}
