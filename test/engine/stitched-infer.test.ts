// Inference paths of the native stitched model: KV-cached prefill / decode against the full forward
// (several slots of different lengths decoded together, truncate, reset), the gate record against a
// gate computed in TypeScript from the hub's own states, the identity / zero-gate start against the
// mean of the models' final states (llama-ops.ts blocks), and bf16 frozen models against fp32 models
// holding the same (rounded) weights.
import { describe, expect, it } from 'vitest';
import { f32ToBf16, info, ops } from '../../lib/index.js';
import { stitchGateName, stitchPlacement, type StitchSpec } from '../../lib/stitch/layout.js';
import { blockContext, blockForward, embed, type LlamaModel } from '../golden/llama-ops.js';
import type { StitchedModel } from '../golden/stitch-ops.js';
import { relErr } from '../helpers.js';
import { batch, config, identityZeroStitches, nativeOf, randomModel, randomStitches, weightsOf } from './stitched-util.js';
import { stitchedCreate } from '../../lib/engine/stitched-native.js';

const c = config({ V: 41, D: 32, F: 48, L: 4, H: 4, Hkv: 2, Dh: 8, maxPos: 48 });
const V = c.vocabSize;
const D = c.hiddenSize;
const hub = randomModel(c, 51);
const experts3 = [randomModel(c, 52), randomModel(c, 53), randomModel(c, 54)];

function stitched(stitches: StitchSpec[], opts: { n?: number; stream?: 'projected' | 'unchanged'; hubBias?: number; tensors?: Map<string, Float32Array> } = {}): StitchedModel {
  const experts = experts3.slice(0, opts.n ?? 3);
  return {
    hub,
    experts,
    stitches,
    expertStream: opts.stream ?? 'projected',
    hubBias: opts.hubBias ?? 0,
    tensors: opts.tensors ?? randomStitches(D, experts.length, stitches, 61),
  };
}

/** The hub's own residual states after blocks 1..j (no stitch), for one sequence [T]. */
function hubStates(model: LlamaModel, ids: Int32Array, T: number, j: number): Float32Array {
  const ctx = blockContext(model.config, 1, T);
  let x = embed(model, ids);
  for (let i = 0; i < j; i++) x = blockForward(model, i, x, ctx, false).y;
  return x;
}

/** Runs fn with BTS_STITCH_GROUP (the grouping test hook, stitched.cc) set to `mode` ('' = auto). */
async function withGrouping<T>(mode: '0' | '1' | '', fn: () => Promise<T>): Promise<T> {
  const old = process.env.BTS_STITCH_GROUP;
  if (mode) process.env.BTS_STITCH_GROUP = mode;
  else delete process.env.BTS_STITCH_GROUP;
  try {
    return await fn();
  } finally {
    if (old === undefined) delete process.env.BTS_STITCH_GROUP;
    else process.env.BTS_STITCH_GROUP = old;
  }
}

describe('KV-cached decode', () => {
  for (const [label, stitches, stream, mode] of [
    ['K=2 alternating, models grouped', stitchPlacement(4, 2), 'projected', '1'],
    ['K=2 alternating, model after model', stitchPlacement(4, 2), 'projected', '0'],
    ['K=4 alternating, unchanged, models grouped', stitchPlacement(4, 4), 'unchanged', '1'],
    ['E->H then a dead H->E, model after model', [{ afterBlock: 2, type: 'eh' }, { afterBlock: 4, type: 'he' }], 'projected', '0'],
  ] as [string, StitchSpec[], 'projected' | 'unchanged', '0' | '1'][]) {
    it(`equals the full forward at every position, 3 slots of different lengths (${label})`, () => withGrouping(mode, async () => {
      const m = stitched(stitches, { stream, hubBias: 0.4 });
      const { net } = nativeOf(m, { grads: false });
      const T = 11;
      const seqs = [0, 1, 2].map((s) => batch(V, 1, T, 70 + s).ids);
      // full forward logits of every sequence [T, V]
      const full = await Promise.all(
        seqs.map(async (ids) => {
          const out = new Float32Array(T * V);
          await net.logits(ids, 1, T, out);
          return out;
        }),
      );
      const cache = net.createCache(4, 16);
      const pre = [3, 6, 1]; // prefill lengths per slot (slot s+1 for sequence s; slot 0 unused)
      const out = new Float32Array(V);
      for (let s = 0; s < 3; s++) {
        await net.prefill(cache, s + 1, seqs[s].subarray(0, pre[s]), out);
        expect(relErr(out, full[s].subarray((pre[s] - 1) * V, pre[s] * V))).toBeLessThanOrEqual(2e-5);
        expect(cache.length(s + 1)).toBe(pre[s]);
      }
      // decode together until each sequence is done (slots drop out as they finish)
      const pos = [...pre];
      while (pos.some((p) => p < T)) {
        const live = [0, 1, 2].filter((s) => pos[s] < T);
        const slots = Int32Array.from(live, (s) => s + 1);
        const tokens = Int32Array.from(live, (s) => seqs[s][pos[s]]);
        const o = new Float32Array(live.length * V);
        await net.decode(cache, slots, tokens, o);
        live.forEach((s, r) => {
          expect(relErr(o.subarray(r * V, (r + 1) * V), full[s].subarray(pos[s] * V, (pos[s] + 1) * V)), `seq ${s} pos ${pos[s]}`).toBeLessThanOrEqual(2e-5);
          pos[s]++;
        });
      }
      expect(cache.length(0)).toBe(0);
      expect(cache.length(2)).toBe(T);
      // truncate then re-decode the same token: same logits as the full forward at that position
      cache.truncate(2, 5);
      expect(cache.length(2)).toBe(5);
      await net.decode(cache, Int32Array.of(2), Int32Array.of(seqs[1][5]), out);
      expect(relErr(out, full[1].subarray(5 * V, 6 * V))).toBeLessThanOrEqual(2e-5);
      // reset, then a prefill of the whole sequence gives the last position
      cache.reset(2);
      expect(cache.length(2)).toBe(0);
      await net.prefill(cache, 2, seqs[1], out);
      expect(relErr(out, full[1].subarray((T - 1) * V, T * V))).toBeLessThanOrEqual(2e-5);
      cache.dispose();
      net.dispose();
    }));
  }

  it('gives the same logits with the models grouped in one parallel region and model after model', async () => {
    const m = stitched(stitchPlacement(4, 2), { hubBias: 0.2 });
    const { net } = nativeOf(m, { grads: false });
    const ids = batch(V, 1, 9, 75).ids;
    const run = (mode: '0' | '1') =>
      withGrouping(mode, async () => {
        const cache = net.createCache(1, 9);
        const out = new Float32Array(9 * V);
        await net.prefill(cache, 0, ids.subarray(0, 4), out.subarray(3 * V));
        for (let t = 4; t < 9; t++) await net.decode(cache, Int32Array.of(0), ids.subarray(t, t + 1), out.subarray(t * V));
        cache.dispose();
        return out;
      });
    const a = await run('0');
    const b = await run('1');
    expect(relErr(b, a)).toBeLessThanOrEqual(1e-6);
    net.dispose();
  });
});

describe('gate record', () => {
  it('gives per stitch, token and model the mean gate: the first stitch exactly as from the hub states; E->H sums to 1, H->E hub slot 0', async () => {
    const stitches = stitchPlacement(4, 4); // he 1, eh 2, he 3, eh 4
    const hubBias = 0.7;
    const m = stitched(stitches, { hubBias });
    const { net } = nativeOf(m, { grads: false });
    const T = 7;
    const M = 4;
    const K = stitches.length;
    const ids = batch(V, 1, T, 80).ids;
    const out = new Float32Array(K * T * M);
    await net.gates(ids, out);
    // stitch 0 (H->E after block 1) only sees the hub's own state after block 1
    const h = hubStates(hub, ids, T, 1);
    const G = ops.gemm({ a: h, b: m.tensors.get(stitchGateName(0))!, m: T, n: D * M, k: D, transB: true });
    for (let t = 0; t < T; t++) {
      expect(out[t * M]).toBe(0);
      for (let mm = 1; mm < M; mm++) {
        let s = 0;
        for (let d = 0; d < D; d++) s += 1 / (1 + Math.exp(-(G[t * D * M + d * M + mm] - hubBias)));
        expect(Math.abs(out[t * M + mm] - s / D), `t ${t} m ${mm}`).toBeLessThanOrEqual(1e-5);
      }
    }
    for (let k = 0; k < K; k++)
      for (let t = 0; t < T; t++) {
        const row = out.subarray((k * T + t) * M, (k * T + t + 1) * M);
        for (const g of row) expect(g >= 0 && g <= 1).toBe(true);
        if (stitches[k].type === 'eh') expect(Math.abs(row.reduce((a, b) => a + b, 0) - 1)).toBeLessThanOrEqual(1e-5);
        else expect(row[0]).toBe(0);
      }
    net.dispose();
  });

  it('matches a softmax computed from the hub states for a first E->H stitch, with the hub bias', async () => {
    const stitches: StitchSpec[] = [{ afterBlock: 2, type: 'eh' }, { afterBlock: 4, type: 'eh' }];
    const m = stitched(stitches, { n: 2, hubBias: -0.9 });
    const { net } = nativeOf(m, { grads: false });
    const T = 5;
    const M = 3;
    const ids = batch(V, 1, T, 81).ids;
    const out = new Float32Array(2 * T * M);
    await net.gates(ids, out);
    const h = hubStates(hub, ids, T, 2);
    const G = ops.gemm({ a: h, b: m.tensors.get(stitchGateName(0))!, m: T, n: D * M, k: D, transB: true });
    for (let t = 0; t < T; t++) {
      const want = [0, 0, 0];
      for (let d = 0; d < D; d++) {
        const l = [0, 1, 2].map((mm) => G[t * D * M + d * M + mm] + (mm === 0 ? -0.9 : 0));
        const mx = Math.max(...l);
        const e = l.map((x) => Math.exp(x - mx));
        const s = e[0] + e[1] + e[2];
        for (let mm = 0; mm < M; mm++) want[mm] += e[mm] / s / D;
      }
      for (let mm = 0; mm < M; mm++) expect(Math.abs(out[t * M + mm] - want[mm])).toBeLessThanOrEqual(1e-5);
    }
    net.dispose();
  });
});

describe('identity projections and zero gates', () => {
  it('make a final E->H stitch output the mean of the models\' final states (hub and experts)', async () => {
    const stitches = stitchPlacement(4, 1); // one E->H after block 4
    const m = stitched(stitches, { tensors: identityZeroStitches(D, 3, stitches) });
    const { net } = nativeOf(m, { grads: false });
    const T = 6;
    const ids = batch(V, 1, T, 90).ids;
    const got = new Float32Array(T * V);
    await net.logits(ids, 1, T, got);
    const states = [hub, ...experts3].map((x) => hubStates(x, ids, T, 4));
    const mean = new Float32Array(T * D);
    for (const s of states) for (let i = 0; i < mean.length; i++) mean[i] += s[i] / 4;
    const xf = ops.rmsnormForward({ x: mean, weight: hub.norm, eps: c.rmsNormEps }).out;
    const want = ops.gemm({ a: xf, b: hub.lmHead, m: T, n: V, k: D, transB: true });
    expect(relErr(got, want)).toBeLessThanOrEqual(1e-5);
    net.dispose();
  });

  it("give the hub's own logits when the experts are copies of the hub (any placement, hub bias)", async () => {
    const T = 6;
    const ids = batch(V, 1, T, 91).ids;
    const xf = ops.rmsnormForward({ x: hubStates(hub, ids, T, 4), weight: hub.norm, eps: c.rmsNormEps }).out;
    const want = ops.gemm({ a: xf, b: hub.lmHead, m: T, n: V, k: D, transB: true });
    for (const stitches of [stitchPlacement(4, 2), stitchPlacement(4, 4, 'all-eh')]) {
      const net = stitchedCreate(c, weightsOf(hub), [weightsOf(hub), weightsOf(hub)], { stitches, expertStream: 'projected', hubBias: 1.3, gateDropout: 0 }, Object.fromEntries(identityZeroStitches(D, 2, stitches)), null);
      const got = new Float32Array(T * V);
      await net.logits(ids, 1, T, got);
      expect(relErr(got, want)).toBeLessThanOrEqual(1e-5);
      net.dispose();
    }
  });
});

describe('bf16 frozen models', () => {
  it('equal fp32 models holding the bf16-rounded weights (logits, loss, stitch gradients, decode)', async () => {
    const stitches = stitchPlacement(4, 2);
    const round = (mod: LlamaModel) => {
      const b16: Record<string, Uint16Array> = {};
      const f32: Record<string, Float32Array> = {};
      for (const [k, v] of mod.tensors) {
        b16[k] = f32ToBf16(v);
        f32[k] = new Float32Array(Uint32Array.from(b16[k], (x) => x << 16).buffer);
      }
      return { b16, f32 };
    };
    const models = [hub, ...experts3.slice(0, 2)].map(round);
    const tensors = randomStitches(D, 2, stitches, 95);
    const spec = { stitches, expertStream: 'projected' as const, hubBias: 0.2, gateDropout: 0 };
    const B = 2;
    const T = 8;
    const { ids, targets } = batch(V, B, T, 96);
    const run = async (which: 'b16' | 'f32') => {
      const grads = Object.fromEntries([...tensors].map(([k, v]) => [k, new Float32Array(v.length)]));
      const net = stitchedCreate(c, models[0][which], models.slice(1).map((x) => x[which]), spec, Object.fromEntries(tensors), grads);
      const logits = new Float32Array(B * T * V);
      await net.logits(ids, B, T, logits);
      const ev = await net.loss(ids, targets, B, T, null);
      await net.forwardBackward(ids, targets, B, T, 1 / ev.count, 0);
      const cache = net.createCache(1, T);
      const dec = new Float32Array(V);
      await net.prefill(cache, 0, ids.subarray(0, T - 1), dec);
      await net.decode(cache, Int32Array.of(0), ids.subarray(T - 1, T), dec);
      net.dispose();
      return { logits, loss: ev.lossSum / ev.count, grads, dec };
    };
    // With AVX512_BF16 the bf16 GEMMs round the activations to bf16 too (ops.h, gemm_bf16): only
    // then are the two runs allowed to differ by more than fp32 rounding.
    const bf16Dot = info().simd === 'avx512' && info().cpu.avx512bf16 === true;
    const tol = bf16Dot ? 3e-2 : 1e-5;
    const a = await run('b16');
    const b = await run('f32');
    expect(relErr(a.logits, b.logits)).toBeLessThanOrEqual(tol);
    expect(Math.abs(a.loss - b.loss) / b.loss).toBeLessThanOrEqual(tol);
    for (const k of tensors.keys()) expect(relErr(a.grads[k], b.grads[k]), k).toBeLessThanOrEqual(bf16Dot ? 5e-2 : 1e-4);
    expect(relErr(a.dec, b.dec)).toBeLessThanOrEqual(tol);
    expect(relErr(a.dec, a.logits.subarray((T - 1) * V, T * V))).toBeLessThanOrEqual(bf16Dot ? tol : 2e-5);
  });
});
