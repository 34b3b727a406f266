// PyTorch golden files (test/golden/data, made by make_golden.py; docs/GOLDEN.md) against the Llama
// forward / backward / KV-cached decode composed from our ops (llama-ops.ts), at every SIMD level.
// Needs no torch: the goldens are committed.
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { llamaTensorNames, openSafetensors, type SimdLevel } from '../../lib/index.js';
import { atLevel, fastLevels, relErr } from '../helpers.js';
import { decode, loadModel, modelFromTensors, trainStep, type LlamaModel } from './llama-ops.js';

const DATA = path.join(path.dirname(fileURLToPath(import.meta.url)), 'data');
const VARIANTS = ['tiny-llama', 'tiny-llama3-rope'];
const LEVELS: SimdLevel[] = [...fastLevels(), 'reference'];

// Tolerances (fp32 on both sides; see docs/GOLDEN.md). Errors are max |ours - torch| relative to the
// max |torch| of the same tensor (relErr; the loss: relative to the loss). Measured here: <= 7e-7
// (logits, decode), <= 1e-7 (loss), <= 1.4e-6 (every gradient tensor) at every level. The bounds
// leave 15-70x room for other CPUs, SIMD levels and thread counts; real mistakes (RoPE pairing, GQA
// mapping, a dropped residual, a wrong loss scale) give 1e-2 .. 1.
const TOL = { logits: 1e-5, loss: 1e-5, grad: 1e-4, decode: 1e-5 };

interface Golden {
  B: number;
  T: number;
  ids: Int32Array;
  targets: Int32Array;
  logits: Float32Array;
  loss: number;
  grads: Map<string, Float32Array>;
  decodeIds: Int32Array;
  decodeLogits: Float32Array;
  decodeSteps: number;
}

function loadGolden(dir: string, model: LlamaModel): Golden {
  using st = openSafetensors(path.join(dir, 'golden.safetensors'));
  const [B, T] = st.tensors.get('input_ids')!.shape;
  const copyF32 = (n: string) => Float32Array.from(st.getF32(n));
  const grads = new Map<string, Float32Array>();
  for (const { name } of llamaTensorNames(model.config)) grads.set(name, copyF32(`grad.${name}`));
  const decodeIds = Int32Array.from(st.get('decode_ids') as Int32Array);
  return {
    B,
    T,
    ids: Int32Array.from(st.get('input_ids') as Int32Array),
    targets: Int32Array.from(st.get('targets') as Int32Array),
    logits: copyF32('logits'),
    loss: st.getF32('loss')[0],
    grads,
    decodeIds,
    decodeLogits: copyF32('decode_logits'),
    decodeSteps: st.tensors.get('decode_logits')!.shape[0],
  };
}

/** Worst relative errors of one training step and one decode against the goldens. */
function errors(model: LlamaModel, g: Golden) {
  const r = trainStep(model, g.ids, g.targets, g.B, g.T);
  const grad: Record<string, number> = {};
  for (const [name, ref] of g.grads) grad[name] = relErr(r.grads.get(name)!, ref);
  const prefill = g.decodeIds.length - g.decodeSteps;
  const dec = decode(model, g.decodeIds, prefill, g.decodeSteps);
  return {
    logits: relErr(r.logits, g.logits),
    loss: Math.abs(r.loss - g.loss) / Math.abs(g.loss),
    grad,
    gradMax: Math.max(...Object.values(grad)),
    decode: relErr(dec, g.decodeLogits),
  };
}

/** Largest error per weight kind (embed, q_proj, ..., lm_head), for the log. */
function byKind(grad: Record<string, number>): Record<string, string> {
  const out: Record<string, number> = {};
  for (const [name, e] of Object.entries(grad)) {
    const kind = name.replace(/^model\.layers\.\d+\./, '').replace(/^model\./, '').replace(/\.weight$/, '');
    out[kind] = Math.max(out[kind] ?? 0, e);
  }
  return Object.fromEntries(Object.entries(out).map(([k, v]) => [k, v.toExponential(1)]));
}

/** A copy of the model with `edit` applied to copies of the named weights. */
function edited(model: LlamaModel, edit: (name: string, w: Float32Array) => Float32Array | undefined): LlamaModel {
  const tensors = new Map<string, Float32Array>();
  for (const [name, w] of model.tensors) tensors.set(name, edit(name, w.slice()) ?? w.slice());
  return modelFromTensors(model.config, tensors);
}

/** Permutes the rows of a [heads*Dh, in] projection within each head: new row r of a head = old row perm[r]. */
function permuteHeadRows(w: Float32Array, heads: number, Dh: number, inF: number, perm: (r: number) => number): Float32Array {
  const out = new Float32Array(w.length);
  for (let h = 0; h < heads; h++)
    for (let r = 0; r < Dh; r++) out.set(w.subarray((h * Dh + perm(r)) * inF, (h * Dh + perm(r) + 1) * inF), (h * Dh + r) * inF);
  return out;
}

for (const variant of VARIANTS) {
  describe(`golden ${variant}`, () => {
    const dir = path.join(DATA, variant);
    const model = loadModel(dir);
    const golden = loadGolden(dir, model);

    it('has the expected files and shapes', () => {
      const c = model.config;
      expect(golden.logits.length).toBe(golden.B * golden.T * c.vocabSize);
      expect(golden.grads.size).toBe(llamaTensorNames(c).length);
      expect(golden.decodeLogits.length).toBe(golden.decodeSteps * c.vocabSize);
      expect(golden.targets).toContain(-100);
      expect(c.numKeyValueHeads).toBeLessThan(c.numAttentionHeads); // GQA is exercised
      if (variant === 'tiny-llama3-rope') expect(c.ropeScaling?.type).toBe('llama3');
    });

    for (const level of LEVELS) {
      it(`matches PyTorch at level ${level}: logits, loss, every gradient, KV-cached decode`, () => {
        const e = atLevel(level, () => errors(model, golden));
        console.log(
          `${variant} @${level}: logits ${e.logits.toExponential(2)} loss ${e.loss.toExponential(2)} decode ${e.decode.toExponential(2)} ` +
            `grad max ${e.gradMax.toExponential(2)} ${JSON.stringify(byKind(e.grad))}`,
        );
        expect(e.logits).toBeLessThanOrEqual(TOL.logits);
        expect(e.loss).toBeLessThanOrEqual(TOL.loss);
        expect(e.decode).toBeLessThanOrEqual(TOL.decode);
        for (const [name, err] of Object.entries(e.grad)) expect(err, `grad.${name}`).toBeLessThanOrEqual(TOL.grad);
      });
    }

    // The comparison must be able to fail: classic mistakes, emulated through the weights, are far
    // outside the tolerances.
    it('catches an interleaved RoPE pairing (q/k rows in GGUF order)', () => {
      const { numAttentionHeads: H, numKeyValueHeads: Hkv, headDim: Dh, hiddenSize: D } = model.config;
      // rotate-half row r (pair r, r + Dh/2) -> interleaved row: (i, i + Dh/2) become (2i, 2i + 1)
      const perm = (r: number) => (r % 2 === 0 ? r / 2 : (r - 1) / 2 + Dh / 2);
      const bad = edited(model, (name, w) =>
        name.endsWith('q_proj.weight') ? permuteHeadRows(w, H, Dh, D, perm) : name.endsWith('k_proj.weight') ? permuteHeadRows(w, Hkv, Dh, D, perm) : undefined,
      );
      const r = trainStep(bad, golden.ids, golden.targets, golden.B, golden.T);
      expect(relErr(r.logits, golden.logits)).toBeGreaterThan(100 * TOL.logits);
    });

    it('catches a wrong GQA head mapping (kv heads swapped)', () => {
      const { numKeyValueHeads: Hkv, headDim: Dh, hiddenSize: D } = model.config;
      // kv head j <-> Hkv-1-j: query head h then reads kv head Hkv-1-h/G instead of h/G
      const swap = (w: Float32Array) => {
        const out = new Float32Array(w.length);
        for (let j = 0; j < Hkv; j++) out.set(w.subarray((Hkv - 1 - j) * Dh * D, (Hkv - j) * Dh * D), j * Dh * D);
        return out;
      };
      const bad = edited(model, (name, w) => (/[kv]_proj\.weight$/.test(name) ? swap(w) : undefined));
      const r = trainStep(bad, golden.ids, golden.targets, golden.B, golden.T);
      expect(relErr(r.logits, golden.logits)).toBeGreaterThan(100 * TOL.logits);
    });

    if (variant === 'tiny-llama3-rope') {
      it('depends on the Llama 3 RoPE scaling (ignoring it fails)', () => {
        const plain = modelFromTensors({ ...model.config, ropeScaling: null }, model.tensors);
        const r = trainStep(plain, golden.ids, golden.targets, golden.B, golden.T);
        expect(relErr(r.logits, golden.logits)).toBeGreaterThan(100 * TOL.logits);
      });
    }
  });
}
