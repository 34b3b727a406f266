// The native engine against the PyTorch golden files (test/golden/data, docs/GOLDEN.md): logits,
// loss, the gradient of every weight through forwardBackward, and the KV-cached decode, at every SIMD
// level of this CPU. Same tolerances as test/golden/llama.test.ts (the op-composed oracle): the engine
// runs the same ops with fused residual adds, so only summation order differs.
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { llamaTensorNames, loadLlamaConfig, openSafetensors, type SimdLevel } from '../../lib/index.js';
import { llamaCreate } from '../../lib/engine/native.js';
import { fastLevels, relErr, atLevelAsync } from '../helpers.js';
import { counted, record, zeroGrads } from './helpers.js';

const DATA = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'golden', 'data');
const VARIANTS = ['tiny-llama', 'tiny-llama3-rope'];
const LEVELS: SimdLevel[] = [...fastLevels(), 'reference'];
const TOL = { logits: 1e-5, loss: 1e-5, grad: 1e-4, decode: 1e-5 };

const atLevel = atLevelAsync;

function load(variant: string) {
  const dir = path.join(DATA, variant);
  const config = loadLlamaConfig(path.join(dir, 'config.json'));
  const tensors = new Map<string, Float32Array>();
  {
    using st = openSafetensors(path.join(dir, 'model.safetensors'));
    for (const { name } of llamaTensorNames(config)) tensors.set(name, Float32Array.from(st.getF32(name)));
  }
  using g = openSafetensors(path.join(dir, 'golden.safetensors'));
  const [B, T] = g.tensors.get('input_ids')!.shape;
  const grads = new Map<string, Float32Array>();
  for (const { name } of llamaTensorNames(config)) grads.set(name, Float32Array.from(g.getF32(`grad.${name}`)));
  return {
    config,
    tensors,
    B,
    T,
    ids: Int32Array.from(g.get('input_ids') as Int32Array),
    targets: Int32Array.from(g.get('targets') as Int32Array),
    logits: Float32Array.from(g.getF32('logits')),
    loss: g.getF32('loss')[0],
    grads,
    decodeIds: Int32Array.from(g.get('decode_ids') as Int32Array),
    decodeLogits: Float32Array.from(g.getF32('decode_logits')),
    decodeSteps: g.tensors.get('decode_logits')!.shape[0],
  };
}

type Golden = ReturnType<typeof load>;

/** Worst errors of the engine against the goldens (weights possibly edited). */
async function errors(g: Golden, tensors = g.tensors) {
  const V = g.config.vocabSize;
  const grads = zeroGrads(g.config);
  const m = llamaCreate(g.config, record(tensors), grads);
  try {
    const logits = new Float32Array(g.B * g.T * V);
    await m.logits(g.ids, g.B, g.T, logits);
    const n = counted(g.targets);
    const r = await m.forwardBackward(g.ids, g.targets, g.B, g.T, 1 / n);
    expect(r.count).toBe(n);
    const grad: Record<string, number> = {};
    for (const [name, ref] of g.grads) grad[name] = relErr(grads[name], ref);
    // KV-cached decode: prefill, then one token at a time (cache larger than used, two slots).
    const prefill = g.decodeIds.length - g.decodeSteps;
    const cache = m.createCache(2, g.decodeIds.length + 3);
    const out = new Float32Array(V);
    await m.prefill(cache, 1, g.decodeIds.slice(0, prefill), out);
    const dec = new Float32Array(g.decodeSteps * V);
    for (let s = 0; s < g.decodeSteps; s++) {
      await m.decode(cache, Int32Array.of(1), g.decodeIds.slice(prefill + s, prefill + s + 1), out);
      dec.set(out, s * V);
    }
    expect(cache.length(1)).toBe(g.decodeIds.length);
    expect(cache.length(0)).toBe(0);
    return {
      logits: relErr(logits, g.logits),
      loss: Math.abs(r.lossSum / r.count - g.loss) / Math.abs(g.loss),
      grad,
      gradMax: Math.max(...Object.values(grad)),
      decode: relErr(dec, g.decodeLogits),
    };
  } finally {
    m.dispose();
  }
}

for (const variant of VARIANTS) {
  describe(`engine golden ${variant}`, () => {
    const g = load(variant);

    for (const level of LEVELS) {
      it(`matches PyTorch at level ${level}: logits, loss, every gradient, KV-cached decode`, async () => {
        const e = await atLevel(level, () => errors(g));
        console.log(`engine ${variant} @${level}: logits ${e.logits.toExponential(2)} loss ${e.loss.toExponential(2)} decode ${e.decode.toExponential(2)} grad max ${e.gradMax.toExponential(2)}`);
        expect(e.logits).toBeLessThanOrEqual(TOL.logits);
        expect(e.loss).toBeLessThanOrEqual(TOL.loss);
        expect(e.decode).toBeLessThanOrEqual(TOL.decode);
        expect(Object.keys(e.grad).length).toBe(llamaTensorNames(g.config).length);
        for (const [name, err] of Object.entries(e.grad)) expect(err, `grad.${name}`).toBeLessThanOrEqual(TOL.grad);
      });
    }

    // The comparison can fail: swapping the kv heads (a wrong GQA mapping, emulated through the
    // weights) misses every check by far.
    it('catches a wrong GQA head mapping (kv heads swapped)', async () => {
      const { numKeyValueHeads: Hkv, headDim: Dh, hiddenSize: D } = g.config;
      const swapped = new Map<string, Float32Array>();
      for (const [name, w] of g.tensors) {
        if (!/[kv]_proj\.weight$/.test(name)) {
          swapped.set(name, w);
          continue;
        }
        const out = new Float32Array(w.length);
        for (let j = 0; j < Hkv; j++) out.set(w.subarray((Hkv - 1 - j) * Dh * D, (Hkv - j) * Dh * D), j * Dh * D);
        swapped.set(name, out);
      }
      const e = await errors(g, swapped);
      expect(e.logits).toBeGreaterThan(100 * TOL.logits);
      expect(e.decode).toBeGreaterThan(100 * TOL.decode);
      expect(e.gradMax).toBeGreaterThan(100 * TOL.grad);
    });
  });
}
