// Validation, lifetimes and training options of the native stitched model: typed errors for bad
// specs, mismatched experts, missing / misnamed / mis-sized tensors, bad token ids, slots and
// capacity, frozen stitches and use after dispose, both through the TS wrapper and straight into the
// binding (the native side must refuse on its own: bad input never crashes the process); gate
// dropout (deterministic per seed, a real change, training only); partial gradient buffers.
import { describe, expect, it } from 'vitest';
import { stitchedCreate, checkExpertConfigs, type NativeStitchSpec } from '../../lib/engine/stitched-native.js';
import { ArgumentError, BtsError, DTypeError, DisposedError, ShapeError, TokenRangeError, fromNative } from '../../lib/index.js';
import { native } from '../../lib/native.js';
import { stitchGateName, stitchPlacement, stitchProjName } from '../../lib/stitch/layout.js';
import { stitchedStep, type StitchedModel } from '../golden/stitch-ops.js';
import { relErr } from '../helpers.js';
import { batch, config, nativeOf, randomModel, randomStitches, weightsOf, zeroGrads } from './stitched-util.js';

const c = config({ V: 23, D: 16, F: 24, L: 4, H: 2, Hkv: 1, Dh: 8, maxPos: 32 });
const V = c.vocabSize;
const D = c.hiddenSize;
const hub = randomModel(c, 101);
const experts = [randomModel(c, 102), randomModel(c, 103)];
const stitches = stitchPlacement(4, 2);
const tensors = randomStitches(D, 2, stitches, 104);
const spec: NativeStitchSpec = { stitches, expertStream: 'projected', hubBias: 0, gateDropout: 0 };
const W = () => Object.fromEntries(tensors);
const create = (o: { spec?: unknown; weights?: unknown; grads?: unknown; experts?: unknown; hub?: unknown } = {}) =>
  stitchedCreate(
    c,
    (o.hub ?? weightsOf(hub)) as never,
    (o.experts ?? experts.map(weightsOf)) as never,
    (o.spec ?? spec) as never,
    (o.weights ?? W()) as never,
    (o.grads === undefined ? null : o.grads) as never,
  );

/** The raw binding, bypassing the TS checks, with native errors mapped to the typed classes. */
function rawCreate(o: { spec?: unknown; weights?: unknown; grads?: unknown; experts?: unknown; hub?: unknown } = {}) {
  try {
    return native().stitchedCreate(c, (o.hub ?? weightsOf(hub)) as never, (o.experts ?? experts.map(weightsOf)) as never, (o.spec ?? spec) as never, (o.weights ?? W()) as never, (o.grads ?? null) as never);
  } catch (e) {
    throw fromNative(e);
  }
}

describe('stitchedCreate refuses bad input with typed errors naming it', () => {
  const bad: [string, NativeStitchSpec['stitches'] | unknown, RegExp][] = [
    ['no stitches', [], /non-empty/],
    ['afterBlock 0', [{ afterBlock: 0, type: 'eh' }], /afterBlock must be an integer in 1..4, got 0/],
    ['afterBlock beyond L', [{ afterBlock: 5, type: 'eh' }], /afterBlock must be an integer in 1..4, got 5/],
    ['not increasing', [{ afterBlock: 3, type: 'he' }, { afterBlock: 3, type: 'eh' }], /must be greater than the previous one/],
    ['bad type', [{ afterBlock: 4, type: 'EH' }], /type must be 'eh' or 'he'/],
  ];
  for (const [label, st, re] of bad) {
    it(`bad spec: ${label} (TS and native)`, () => {
      const s = { ...spec, stitches: st };
      expect(() => create({ spec: s })).toThrow(ArgumentError);
      expect(() => create({ spec: s })).toThrow(re);
      // the binding / engine refuse it too (weights for the stitches that exist)
      const k = (st as unknown[]).length;
      const w = k ? Object.fromEntries(randomStitches(D, 2, stitchPlacement(4, k), 1)) : {};
      expect(() => rawCreate({ spec: s, weights: w })).toThrow(ArgumentError);
    });
  }

  it('bad options: expertStream, hubBias, gateDropout (TS and native)', () => {
    for (const [s, re] of [
      [{ ...spec, expertStream: 'projection' }, /expertStream must be 'projected' or 'unchanged'/],
      [{ ...spec, hubBias: NaN }, /hubBias must be (a )?finite/],
      [{ ...spec, gateDropout: 1 }, /gateDropout must be/],
      [{ ...spec, gateDropout: -0.1 }, /gateDropout must be/],
    ] as [unknown, RegExp][]) {
      expect(() => create({ spec: s })).toThrow(re);
      expect(() => rawCreate({ spec: s })).toThrow(ArgumentError);
      expect(() => rawCreate({ spec: s })).toThrow(re);
    }
  });

  it('mismatched experts: a config field (named), a tensor of another shape (named with the expert)', () => {
    const other = { ...c, intermediateSize: 32 };
    expect(() => checkExpertConfigs(c, [c, other], ['code', 'math'])).toThrow(/expert 1 \(math\) has intermediateSize 32, the hub 24/);
    expect(() =>
      stitchedCreate(c, weightsOf(hub), experts.map(weightsOf), spec, W(), null, { expertConfigs: [c, { ...c, ropeTheta: 500000 }] }),
    ).toThrow(/expert 1 has ropeTheta 500000, the hub 10000/);
    const small = randomModel(other, 5);
    expect(() => create({ experts: [weightsOf(experts[0]), weightsOf(small)] })).toThrow(ShapeError);
    expect(() => create({ experts: [weightsOf(experts[0]), weightsOf(small)] })).toThrow(/experts\[1\]\['model.layers.0.mlp.gate_proj.weight'\] has 512 elements, expected numel = 384/);
    expect(() => rawCreate({ experts: [weightsOf(experts[0]), weightsOf(small)] })).toThrow(/experts\[1\]\['model.layers.0.mlp.gate_proj.weight'\] has 512 elements/);
    expect(() => create({ experts: [] })).toThrow(ArgumentError);
    expect(() => rawCreate({ experts: [] })).toThrow(ArgumentError);
  });

  it('missing, unknown and mis-sized stitch tensors; model weights of the wrong kind', () => {
    const w = W();
    delete w[stitchProjName(1, 1)];
    expect(() => create({ weights: w })).toThrow(/stitch tensor 'stitch.1.proj.1.weight' is missing/);
    expect(() => rawCreate({ weights: w })).toThrow(/stitch tensor 'stitch.1.proj.1.weight' is missing/);
    const extra = { ...W(), 'stitch.2.gate.weight': new Float32Array(D * 3 * D) };
    expect(() => create({ weights: extra })).toThrow(/'stitch.2.gate.weight', not one of the stitch tensors of 2 stitches and 2 experts/);
    expect(() => rawCreate({ weights: extra })).toThrow(/'stitch.2.gate.weight', not a stitch tensor/);
    const short = { ...W(), [stitchGateName(0)]: new Float32Array(D * D) };
    expect(() => create({ weights: short })).toThrow(ShapeError);
    expect(() => rawCreate({ weights: short })).toThrow(ShapeError);
    const f64 = { ...W(), [stitchGateName(0)]: new Float64Array(3 * D * D) };
    expect(() => create({ weights: f64 })).toThrow(DTypeError);
    expect(() => rawCreate({ weights: f64 })).toThrow(DTypeError);
    const badGrad = { [stitchProjName(0, 0)]: new Float32Array(3) };
    expect(() => create({ grads: badGrad })).toThrow(ShapeError);
    expect(() => rawCreate({ grads: badGrad })).toThrow(ShapeError);
    const h = weightsOf(hub) as Record<string, unknown>;
    expect(() => create({ hub: { ...h, 'model.norm.weight': undefined } })).toThrow(/hub: weight 'model.norm.weight' is missing/);
    expect(() => rawCreate({ hub: { ...h, 'model.norm.weight': undefined } })).toThrow(/hub: weight 'model.norm.weight' is missing/);
    expect(() => create({ hub: { ...h, 'model.layers.9.x': new Float32Array(1) } })).toThrow(/hub has 'model.layers.9.x', not a tensor/);
    // a mapped weight whose file is a look-alike object, not a NativeMappedFile: the TS check lets it
    // through (it has a byteLength), the binding refuses it by its missing type tag
    const mapped = { ...h, 'model.norm.weight': { file: { byteLength: 100 }, offset: 0, dtype: 'f32', length: D } };
    expect(() => create({ hub: mapped })).toThrow(ArgumentError);
    expect(() => create({ hub: mapped })).toThrow(/hub\['model.norm.weight'\].file must be a NativeMappedFile/);
    expect(() => rawCreate({ hub: mapped })).toThrow(ArgumentError);
    const notFile = { ...h, 'model.norm.weight': { file: {}, offset: 0, dtype: 'f32', length: D } };
    expect(() => create({ hub: notFile })).toThrow(/file must be a NativeMappedFile/);
  });

  it('bad calls: lengths, token ids (named), frozen training, slots, capacity, dispose', async () => {
    const net = create();
    const { ids, targets } = batch(V, 2, 5, 1);
    await expect(net.forwardBackward(ids, targets, 2, 5, 1, 0)).rejects.toThrow(/created without gradient buffers/);
    await expect(net.logits(ids, 2, 5, new Float32Array(3))).rejects.toThrow(ShapeError);
    await expect(net.loss(ids, targets, 2, 4, null)).rejects.toThrow(ShapeError);
    const badIds = ids.slice();
    badIds[7] = V;
    await expect(net.loss(badIds, targets, 2, 5, null)).rejects.toThrow(TokenRangeError);
    await expect(net.loss(badIds, targets, 2, 5, null)).rejects.toThrow(/'inputs' at position 7 is 23, outside \[0, V\)/);
    const badT = targets.slice();
    badT[2] = -5;
    await expect(net.loss(ids, badT, 2, 5, null)).rejects.toThrow(/'targets' at position 2 is -5/);
    await expect(net.logits(ids, 1, 10, new Float32Array(10 * V))).resolves.toBeUndefined();
    await expect(net.logits(new Int32Array(40), 1, 40, new Float32Array(40 * V))).rejects.toThrow(/exceeds maxPositionEmbeddings/);
    await expect(net.gates(ids, new Float32Array(5))).rejects.toThrow(ShapeError);
    const cache = net.createCache(2, 4);
    const out = new Float32Array(2 * V);
    await expect(net.prefill(cache, 2, ids.subarray(0, 2), out)).rejects.toThrow(/slot/);
    await expect(net.prefill(cache, 0, ids.subarray(0, 5), out)).rejects.toThrow(/exceed the cache capacity of 4/);
    await net.prefill(cache, 0, ids.subarray(0, 4), out);
    await expect(net.decode(cache, Int32Array.of(0), Int32Array.of(1), out)).rejects.toThrow(/slot 0 is full/);
    await expect(net.decode(cache, Int32Array.of(1, 1), Int32Array.of(1, 2), out)).rejects.toThrow(/appears twice/);
    expect(() => cache.truncate(0, 5)).toThrow(ArgumentError);
    expect(() => net.createCache(1, 33)).toThrow(/capacity/);
    // a cache of another model is refused
    const other = create();
    const otherCache = other.createCache(1, 4);
    await expect(net.prefill(otherCache, 0, ids.subarray(0, 1), out)).rejects.toThrow(/another model/);
    // a pending call keeps the model alive through dispose(); later calls are refused
    const pending = net.logits(ids, 2, 5, new Float32Array(10 * V));
    net.dispose();
    await expect(pending).resolves.toBeUndefined();
    await expect(net.logits(ids, 2, 5, new Float32Array(10 * V))).rejects.toThrow(DisposedError);
    expect(() => net.createCache(1, 4)).toThrow(BtsError);
    net.dispose(); // idempotent
    cache.dispose();
    expect(() => cache.length(0)).toThrow(DisposedError);
    other.dispose();
  });
});

describe('training options', () => {
  const B = 2;
  const T = 8;
  const { ids, targets } = batch(V, B, T, 7);
  const m: StitchedModel = { hub, experts, stitches: stitchPlacement(4, 4), expertStream: 'projected', hubBias: 0.3, tensors: randomStitches(D, 2, stitchPlacement(4, 4), 9) };

  it('gate dropout: the same seed gives the same step, another seed another; inference has none', async () => {
    const step = async (p: number, seed: number) => {
      const { net, grads } = nativeOf(m, { gateDropout: p });
      const r = await net.forwardBackward(ids, targets, B, T, 1, seed);
      const ev = await net.loss(ids, targets, B, T, null);
      net.dispose();
      return { loss: r.lossSum, eval: ev.lossSum, grads: grads! };
    };
    const none = await step(0, 1);
    const a = await step(0.4, 1);
    const a2 = await step(0.4, 1);
    const b = await step(0.4, 2);
    expect(a2.loss).toBe(a.loss);
    for (const k of Object.keys(a.grads)) expect(a2.grads[k]).toEqual(a.grads[k]);
    expect(b.loss).not.toBe(a.loss);
    expect(a.loss).not.toBe(none.loss);
    expect(relErr(a.grads[stitchGateName(3)], b.grads[stitchGateName(3)])).toBeGreaterThan(1e-3);
    // loss() is inference: no dropout, whatever the option
    expect(a.eval).toBe(none.eval);
    expect(Math.abs(none.loss - none.eval) / none.eval).toBeLessThanOrEqual(1e-6);
    // dropout 0 (the default) equals the oracle
    const ref = stitchedStep(m, ids, targets, B, T);
    expect(Math.abs(none.loss / ref.count - ref.loss) / ref.loss).toBeLessThanOrEqual(1e-5);
  });

  it('partial gradient buffers: only the given tensors accumulate, with the values of full buffers', async () => {
    const full = nativeOf(m);
    await full.net.forwardBackward(ids, targets, B, T, 1, 0);
    full.net.dispose();
    // train only stitch 2 (and the projection of expert 1 at stitch 3)
    const names = [stitchGateName(2), stitchProjName(2, 0), stitchProjName(2, 1), stitchProjName(3, 1)];
    const grads = Object.fromEntries(names.map((k) => [k, new Float32Array(m.tensors.get(k)!.length)]));
    const net = stitchedCreate(m.hub.config, weightsOf(hub), experts.map(weightsOf), { stitches: m.stitches, expertStream: 'projected', hubBias: 0.3, gateDropout: 0 }, Object.fromEntries(m.tensors), grads);
    await net.forwardBackward(ids, targets, B, T, 1, 0);
    net.dispose();
    for (const k of names) expect(relErr(grads[k], full.grads![k]), k).toBeLessThanOrEqual(1e-5);
    // and the full run produced non-zero gradients everywhere (stitch 0's hub rows aside)
    for (const [k, g] of Object.entries(full.grads!)) expect(g.some((x) => x !== 0), k).toBe(true);
    expect(Object.keys(zeroGrads(m)).length).toBe(4 * 3);
  });
});
