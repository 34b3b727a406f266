// The native engine against the TS oracle (test/golden/llama-ops.ts: the same Llama composed from the
// public ops, itself checked against PyTorch) on a random config with odd sizes (V 37, D 40, H 5,
// Hkv 1, Dh 8, F 56, L 2; B 2, T 13), tied and untied, at every SIMD level: logits, loss, every
// gradient, KV-cached decode. Also the gradient contract: accumulation (+=), gradScale, ignored
// targets, and partial gradients (frozen tensors and layers) giving the same values as full ones.
import { describe, expect, it } from 'vitest';
import { llamaTensorNames, type SimdLevel } from '../../lib/index.js';
import { llamaCreate } from '../../lib/engine/native.js';
import { fastLevels, randIds, relErr, atLevelAsync } from '../helpers.js';
import { decode as oracleDecode, trainStep } from '../golden/llama-ops.js';
import { counted, nextTokenTargets, oracleModel, randomTensors, record, smallConfig, zeroGrads } from './helpers.js';

const LEVELS: SimdLevel[] = [...fastLevels(), 'reference'];
// Same ops on both sides; only the engine's fused residual adds (GEMM beta = 1) and its decode GEMM
// paths change the summation order. Measured <= 1e-6 (logits, decode), <= 3e-6 (gradients).
const TOL = { logits: 1e-5, loss: 1e-5, grad: 5e-5, decode: 1e-5 };
const B = 2;
const T = 13;

const atLevel = atLevelAsync;

for (const tie of [false, true]) {
  describe(`engine vs oracle, odd sizes, ${tie ? 'tied' : 'untied'} embeddings`, () => {
    const config = smallConfig({ tieWordEmbeddings: tie });
    const V = config.vocabSize;
    const tensors = randomTensors(config, tie ? 11 : 12);
    const ids = randIds(B * T, V, 5);
    const targets = nextTokenTargets(ids, B, T, [3, 17]);
    const ref = trainStep(oracleModel(config, tensors), ids, targets, B, T);
    const n = counted(targets);

    for (const level of LEVELS) {
      it(`matches the oracle at level ${level}`, async () => {
        await atLevel(level, async () => {
          const grads = zeroGrads(config);
          const m = llamaCreate(config, record(tensors), grads);
          const logits = new Float32Array(B * T * V);
          await m.logits(ids, B, T, logits);
          const r = await m.forwardBackward(ids, targets, B, T, 1 / n);
          expect(r.count).toBe(n);
          const losses = new Float32Array(B * T);
          const l = await m.loss(ids, targets, B, T, losses);
          expect(l.count).toBe(n);
          expect(Math.abs(l.lossSum - r.lossSum)).toBeLessThanOrEqual(1e-6 * Math.abs(r.lossSum));
          let sum = 0;
          for (let i = 0; i < B * T; i++) {
            if (targets[i] === -100) expect(losses[i]).toBe(0);
            sum += losses[i];
          }
          expect(Math.abs(sum - l.lossSum)).toBeLessThanOrEqual(1e-4 * Math.abs(l.lossSum));

          const eLogits = relErr(logits, ref.logits);
          const eLoss = Math.abs(r.lossSum / r.count - ref.loss) / ref.loss;
          let eGrad = 0;
          for (const { name } of llamaTensorNames(config)) {
            const e = relErr(grads[name], ref.grads.get(name)!);
            expect(e, name).toBeLessThanOrEqual(TOL.grad);
            eGrad = Math.max(eGrad, e);
          }
          // KV-cached decode of row 1: prefill 6, then 5 single tokens.
          const row = ids.slice(T, 2 * T);
          const want = oracleDecode(oracleModel(config, tensors), row, 6, 5);
          const cache = m.createCache(3, 20);
          const out = new Float32Array(V);
          await m.prefill(cache, 2, row.slice(0, 6), out);
          const got = new Float32Array(5 * V);
          for (let s = 0; s < 5; s++) {
            await m.decode(cache, Int32Array.of(2), row.slice(6 + s, 7 + s), out);
            got.set(out, s * V);
          }
          const eDecode = relErr(got, want);
          console.log(`oracle ${tie ? 'tied' : 'untied'} @${level}: logits ${eLogits.toExponential(2)} loss ${eLoss.toExponential(2)} grad ${eGrad.toExponential(2)} decode ${eDecode.toExponential(2)}`);
          expect(eLogits).toBeLessThanOrEqual(TOL.logits);
          expect(eLoss).toBeLessThanOrEqual(TOL.loss);
          expect(eDecode).toBeLessThanOrEqual(TOL.decode);
          m.dispose();
        });
      });
    }

    it('accumulates gradients (+=) scaled by gradScale', async () => {
      const g1 = zeroGrads(config);
      const m1 = llamaCreate(config, record(tensors), g1);
      await m1.forwardBackward(ids, targets, B, T, 1);
      const g2 = zeroGrads(config);
      const m2 = llamaCreate(config, record(tensors), g2);
      await m2.forwardBackward(ids, targets, B, T, 0.5);
      await m2.forwardBackward(ids, targets, B, T, 0.5);
      await m2.forwardBackward(ids, targets, B, T, 1);
      for (const { name } of llamaTensorNames(config)) {
        // g2 = 0.5 g + 0.5 g + g = 2 g (scaling by powers of two is exact up to summation order)
        const twice = g1[name].map((x) => 2 * x);
        expect(relErr(g2[name], twice), name).toBeLessThanOrEqual(1e-6);
        // and it is the oracle's gradient of the MEAN loss times the count
        expect(relErr(g1[name], ref.grads.get(name)!.map((x) => x * n)), name).toBeLessThanOrEqual(TOL.grad);
      }
      m1.dispose();
      m2.dispose();
    });

    it('all targets ignored: zero loss, count 0, no gradient', async () => {
      const grads = zeroGrads(config);
      const m = llamaCreate(config, record(tensors), grads);
      const r = await m.forwardBackward(ids, new Int32Array(B * T).fill(-100), B, T, 1);
      expect(r).toEqual({ lossSum: 0, count: 0 });
      for (const g of Object.values(grads)) expect(g.every((x) => x === 0)).toBe(true);
      m.dispose();
    });
  });
}

describe('partial gradients (frozen tensors and layers)', () => {
  const config = smallConfig({ numHiddenLayers: 3 });
  const tensors = randomTensors(config, 21);
  const ids = randIds(B * T, config.vocabSize, 22);
  const targets = nextTokenTargets(ids, B, T);
  const full = zeroGrads(config);

  it('equal the full gradients where given, leave the rest untouched', async () => {
    const m = llamaCreate(config, record(tensors), full);
    await m.forwardBackward(ids, targets, B, T, 1 / 24);
    m.dispose();
    for (const g of Object.values(full)) expect(g.some((x) => x !== 0)).toBe(true);
    const subsets: [string, (name: string) => boolean][] = [
      ['layer 1 only', (n) => n.startsWith('model.layers.1.')],
      ['top layer only', (n) => n.startsWith('model.layers.2.')],
      ['LM head and final norm only', (n) => n === 'lm_head.weight' || n === 'model.norm.weight'],
      ['embedding only', (n) => n === 'model.embed_tokens.weight'],
      ['q_proj and down_proj of layer 0', (n) => n === 'model.layers.0.self_attn.q_proj.weight' || n === 'model.layers.0.mlp.down_proj.weight'],
      ['input_layernorm of layer 0', (n) => n === 'model.layers.0.input_layernorm.weight'],
    ];
    for (const [what, pick] of subsets) {
      const part = zeroGrads(config, pick);
      const mp = llamaCreate(config, record(tensors), part);
      await mp.forwardBackward(ids, targets, B, T, 1 / 24);
      mp.dispose();
      expect(Object.keys(part).length, what).toBeGreaterThan(0);
      // The same ops in the same order: bit-identical.
      for (const [name, g] of Object.entries(part)) expect(Array.from(g), `${what}: ${name}`).toEqual(Array.from(full[name]));
    }
  });
});
