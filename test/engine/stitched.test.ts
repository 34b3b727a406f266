// The native stitched model (native/engine/stitched.cc through lib/engine/stitched-native.ts) against
// (1) the PyTorch goldens of make_stitch_golden.py (test/golden/data/tiny-stitch*: hub logits, loss
// and every stitch gradient) at every SIMD level, (2) the TS oracle composed from our ops
// (test/golden/stitch-ops.ts) on random models of odd sizes with n = 1 and n = 3 experts and every
// placement kind (alternating, K = 1, all E->H, an H->E stitch after the last E->H, first stitch
// after block 1), both expert streams, hub bias, tied embeddings, and (3) finite differences of the
// native loss for the native stitch gradients, through the frozen blocks, also under gate dropout.
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { openSafetensors, type SimdLevel } from '../../lib/index.js';
import { stitchPlacement, type StitchSpec } from '../../lib/stitch/layout.js';
import { loadStitched, stitchedStep, type StitchedModel } from '../golden/stitch-ops.js';
import { atLevelAsync, fastLevels, randn, relErr, rng } from '../helpers.js';
import { batch, config, nativeOf, randomModel, randomStitches } from './stitched-util.js';

const DATA = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'golden', 'data');
const LEVELS: SimdLevel[] = [...fastLevels(), 'reference'];

// Tolerances: max |ours - ref| / max |ref| per tensor (relErr). PyTorch goldens as the oracle's own
// test (test/golden/stitch.test.ts: measured there <= 4e-7 logits, <= 1.5e-6 gradients); against the
// oracle (same ops, different buffers and GEMM fusions) a little looser for the odd sizes.
const TOL = { logits: 1e-5, loss: 1e-5, grad: 1e-4 };


/** logits, mean loss and gradients of the mean loss from the native model. */
async function nativeStep(m: StitchedModel, ids: Int32Array, targets: Int32Array, B: number, T: number, gateDropout = 0, seed = 0) {
  const { net, grads } = nativeOf(m, { gateDropout });
  try {
    const V = m.hub.config.vocabSize;
    const logits = new Float32Array(B * T * V);
    await net.logits(ids, B, T, logits);
    const ev = await net.loss(ids, targets, B, T, null);
    const tr = await net.forwardBackward(ids, targets, B, T, 1 / ev.count, seed);
    return { logits, loss: ev.lossSum / ev.count, trainLoss: tr.lossSum / tr.count, count: tr.count, grads: new Map(Object.entries(grads!)) };
  } finally {
    net.dispose();
  }
}

function gradErr(ours: Map<string, Float32Array>, ref: Map<string, Float32Array>): Record<string, number> {
  const e: Record<string, number> = {};
  for (const [name, r] of ref) {
    const o = ours.get(name);
    if (!o) throw new Error(`no gradient for ${name}`);
    e[name] = relErr(o, r, 1e-12);
  }
  return e;
}

// ---------------------------------------------------------------------------------------------------

for (const name of ['tiny-stitch', 'tiny-stitch-alleh', 'tiny-stitch-k3', 'tiny-stitch-k4']) {
  describe(`golden ${name}`, () => {
    const dir = path.join(DATA, name);
    const { model } = loadStitched(dir);
    using st = openSafetensors(path.join(dir, 'golden.safetensors'));
    const [B, T] = st.tensors.get('input_ids')!.shape;
    const ids = Int32Array.from(st.get('input_ids') as Int32Array);
    const targets = Int32Array.from(st.get('targets') as Int32Array);
    const logits = Float32Array.from(st.getF32('logits'));
    const loss = st.getF32('loss')[0];
    const grads = new Map([...model.tensors.keys()].map((k) => [k, Float32Array.from(st.getF32(`grad.${k}`))]));

    for (const level of LEVELS) {
      it(`matches PyTorch at level ${level}: hub logits, loss, every stitch gradient`, async () => {
        const r = await atLevelAsync(level, () => nativeStep(model, ids, targets, B, T));
        const ge = gradErr(r.grads, grads);
        const worst = Math.max(...Object.values(ge));
        console.log(`${name} @${level}: logits ${relErr(r.logits, logits).toExponential(2)} loss ${(Math.abs(r.loss - loss) / loss).toExponential(2)} grad max ${worst.toExponential(2)}`);
        expect(relErr(r.logits, logits)).toBeLessThanOrEqual(TOL.logits);
        expect(Math.abs(r.loss - loss) / loss).toBeLessThanOrEqual(TOL.loss);
        expect(Math.abs(r.trainLoss - loss) / loss).toBeLessThanOrEqual(TOL.loss);
        for (const [k, err] of Object.entries(ge)) expect(err, `grad.${k}`).toBeLessThanOrEqual(TOL.grad);
      });
    }

    it('accumulates gradients over calls and scales them by gradScale', async () => {
      const { net, grads: g } = nativeOf(model);
      try {
        const a = await net.forwardBackward(ids, targets, B, T, 1, 0);
        const once = new Map(Object.entries(g!).map(([k, v]) => [k, v.slice()]));
        await net.forwardBackward(ids, targets, B, T, 0.5, 0);
        for (const [k, v] of Object.entries(g!)) {
          const want = once.get(k)!.map((x) => 1.5 * x);
          expect(relErr(v, want, 1e-12), k).toBeLessThanOrEqual(1e-6);
          // and the golden mean-loss gradient, times the count
          expect(relErr(once.get(k)!, grads.get(k)!.map((x) => x * a.count), 1e-12), k).toBeLessThanOrEqual(TOL.grad);
        }
      } finally {
        net.dispose();
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------------
// The oracle on random models of odd sizes.

interface Case {
  label: string;
  n: number;
  L: number;
  stitches: StitchSpec[];
  stream: 'projected' | 'unchanged';
  hubBias: number;
  tie?: boolean;
}

const CASES: Case[] = [
  { label: 'n=1, K=2 alternating', n: 1, L: 4, stitches: stitchPlacement(4, 2), stream: 'projected', hubBias: 0 },
  { label: 'n=3, K=3 alternating from block 1, hub bias, tied', n: 3, L: 3, stitches: stitchPlacement(3, 3), stream: 'projected', hubBias: 0.6, tie: true },
  { label: 'n=3, K=1', n: 3, L: 3, stitches: stitchPlacement(3, 1), stream: 'projected', hubBias: 0 },
  { label: 'n=3, all E->H, unchanged', n: 3, L: 3, stitches: stitchPlacement(3, 3, 'all-eh'), stream: 'unchanged', hubBias: -0.4 },
  { label: 'n=1, E->H then H->E after it (dead H->E)', n: 1, L: 4, stitches: [{ afterBlock: 2, type: 'eh' }, { afterBlock: 3, type: 'he' }], stream: 'projected', hubBias: 0.3 },
  { label: 'n=3, H->E then E->H mid-model, unchanged', n: 3, L: 4, stitches: [{ afterBlock: 1, type: 'he' }, { afterBlock: 3, type: 'eh' }], stream: 'unchanged', hubBias: 0 },
];

describe('native stitched model vs the TS oracle (odd sizes)', () => {
  for (const cs of CASES) {
    it(cs.label, async () => {
      const c = config({ V: 37, D: 40, F: 56, L: cs.L, H: 5, Hkv: 1, Dh: 8, tie: cs.tie });
      const hub = randomModel(c, 1);
      const experts = Array.from({ length: cs.n }, (_, e) => randomModel(c, 2 + e));
      const m: StitchedModel = { hub, experts, stitches: cs.stitches, expertStream: cs.stream, hubBias: cs.hubBias, tensors: randomStitches(c.hiddenSize, cs.n, cs.stitches, 5) };
      const B = 2;
      const T = 9;
      const { ids, targets } = batch(c.vocabSize, B, T, 11, [3]);
      const ref = stitchedStep(m, ids, targets, B, T);
      const r = await nativeStep(m, ids, targets, B, T);
      expect(r.count).toBe(ref.count);
      expect(relErr(r.logits, ref.logits)).toBeLessThanOrEqual(TOL.logits);
      expect(Math.abs(r.loss - ref.loss) / ref.loss).toBeLessThanOrEqual(TOL.loss);
      expect(Math.abs(r.trainLoss - ref.loss) / ref.loss).toBeLessThanOrEqual(TOL.loss);
      const ge = gradErr(r.grads, ref.grads);
      for (const [k, err] of Object.entries(ge)) {
        const zero = ref.grads.get(k)!.every((x) => x === 0);
        if (zero) expect(r.grads.get(k)!.every((x) => x === 0), `${k} must stay zero`).toBe(true);
        else expect(err, k).toBeLessThanOrEqual(TOL.grad);
      }
    });
  }
});

// ---------------------------------------------------------------------------------------------------
// Finite differences of the native loss.

describe('native stitch gradients vs finite differences through the frozen blocks', () => {
  const c = config({ V: 29, D: 24, F: 40, L: 4, H: 3, Hkv: 1, Dh: 8 });
  const hub = randomModel(c, 21);
  const experts = [randomModel(c, 22), randomModel(c, 23)];
  const B = 2;
  const T = 6;
  const { ids, targets } = batch(c.vocabSize, B, T, 31);

  for (const [label, stitches, gateDropout] of [
    ['K=2 alternating', stitchPlacement(4, 2), 0],
    ['K=3 alternating, gate dropout 0.3', stitchPlacement(4, 3), 0.3],
  ] as [string, StitchSpec[], number][]) {
    it(label, async () => {
      const m: StitchedModel = { hub, experts, stitches, expertStream: 'projected', hubBias: 0.2, tensors: randomStitches(c.hiddenSize, 2, stitches, 41) };
      const { net, grads } = nativeOf(m, { gateDropout });
      const seed = 1234;
      try {
        // The loss of the training step is a deterministic function of the weights for a fixed seed
        // (the dropout mask depends on the seed and positions only), so it can be differentiated.
        const scratch = nativeOf(m, { gateDropout });
        const f = async () => {
          const r = await scratch.net.forwardBackward(ids, targets, B, T, 0, seed);
          return r.lossSum;
        };
        await net.forwardBackward(ids, targets, B, T, 1, seed);
        const pick = rng(7);
        let worst = 0;
        for (const [name, w] of m.tensors) {
          const g = grads![name];
          let scale = 0;
          for (const x of g) scale = Math.max(scale, Math.abs(x));
          if (scale === 0) continue;
          // one random direction over the whole tensor, and two large entries
          const u = randn(w.length, name.length + 3);
          const orig = w.slice();
          const eps = 2e-3;
          for (let i = 0; i < w.length; i++) w[i] = orig[i] + eps * u[i];
          const fp = await f();
          for (let i = 0; i < w.length; i++) w[i] = orig[i] - eps * u[i];
          const fm = await f();
          w.set(orig);
          let dd = 0;
          for (let i = 0; i < w.length; i++) dd += g[i] * u[i];
          const num = (fp - fm) / (2 * eps);
          worst = Math.max(worst, Math.abs(num - dd) / Math.max(Math.abs(num), Math.abs(dd)));
          for (let tries = 0, done = 0; done < 2 && tries < 1000; tries++) {
            const i = Math.floor(pick() * w.length);
            if (Math.abs(g[i]) < 0.3 * scale) continue;
            done++;
            const old = w[i];
            const e1 = 1e-2;
            w[i] = old + e1;
            const a = await f();
            w[i] = old - e1;
            const b = await f();
            w[i] = old;
            const n1 = (a - b) / (2 * e1);
            worst = Math.max(worst, Math.abs(n1 - g[i]) / Math.max(Math.abs(n1), Math.abs(g[i]), 0.01 * scale));
          }
        }
        scratch.net.dispose();
        console.log(`finite differences (${label}): worst ${worst.toExponential(2)}`);
        expect(worst).toBeLessThanOrEqual(2e-2);
      } finally {
        net.dispose();
      }
    });
  }
});
