// Memory-mapped hub and expert weights in the native stitched model: models written as safetensors by
// the lib writer (fp32, and bf16 matrices with fp32 norms), mapped with mapFile and passed as {file,
// offset, dtype, length}, give exactly (bit for bit) the logits, losses, stitch gradients and decode
// logits of a stitched model built from the same arrays; a model keeps its mappings after the file
// handles are disposed; a disposed file, a tensor outside the file and a look-alike file object are
// typed errors naming the model and tensor.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ArgumentError, DisposedError, f32ToBf16, llamaTensorNames, openSafetensors, writeSafetensors, type TensorToWrite } from '../../lib/index.js';
import { mapFile, type NativeMappedFile, type NativeWeight } from '../../lib/engine/native.js';
import { stitchedCreate, type NativeStitchSpec } from '../../lib/engine/stitched-native.js';
import { stitchPlacement } from '../../lib/stitch/layout.js';
import { batch, config, randomModel, randomStitches, weightsOf } from './stitched-util.js';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bts-stitched-map-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

const c = config({ V: 29, D: 16, F: 24, L: 4, H: 2, Hkv: 1, Dh: 8, maxPos: 32 });
const V = c.vocabSize;
const D = c.hiddenSize;
const stitches = stitchPlacement(4, 2);
const spec: NativeStitchSpec = { stitches, expertStream: 'projected', hubBias: 0.1, gateDropout: 0 };
const tensors = randomStitches(D, 2, stitches, 71);

/** The model's tensors with the matrices as bf16 bits (norms stay fp32, as the engine widens them anyway). */
function bf16Of(w: Record<string, Float32Array>): Record<string, Float32Array | Uint16Array> {
  return Object.fromEntries(Object.entries(w).map(([k, v]) => [k, k.endsWith('norm.weight') ? v : f32ToBf16(v)]));
}

/** Writes `arrays` as one safetensors file and maps it: the mapped weights record and the file handle. */
function writeAndMap(name: string, arrays: Record<string, Float32Array | Uint16Array>): { mf: NativeMappedFile; weights: Record<string, NativeWeight> } {
  const file = path.join(dir, name);
  const shapes = new Map(llamaTensorNames(c).map((s) => [s.name, s.shape]));
  const out: Record<string, TensorToWrite> = {};
  for (const [k, a] of Object.entries(arrays)) out[k] = { dtype: a instanceof Uint16Array ? 'BF16' : 'F32', shape: shapes.get(k)!, data: a };
  writeSafetensors(file, out);
  const mf = mapFile(file);
  const weights: Record<string, NativeWeight> = {};
  using st = openSafetensors(file, { load: 'lazy' });
  for (const [k, t] of st.tensors) {
    const dtype = t.dtype === 'BF16' ? ('bf16' as const) : ('f32' as const);
    weights[k] = { file: mf, offset: t.byteOffset, dtype, length: t.byteLength / (dtype === 'bf16' ? 2 : 4) };
  }
  return { mf, weights };
}

/** Everything a stitched model computes on one batch: logits, loss, stitch gradients, prefill + decode logits. */
async function outputs(hub: Record<string, NativeWeight>, experts: Record<string, NativeWeight>[], dispose?: () => void) {
  const B = 2;
  const T = 7;
  const { ids, targets } = batch(V, B, T, 72);
  const grads = Object.fromEntries([...tensors].map(([k, v]) => [k, new Float32Array(v.length)]));
  const net = stitchedCreate(c, hub, experts, spec, Object.fromEntries(tensors), grads);
  dispose?.(); // the model keeps its mappings
  const logits = new Float32Array(B * T * V);
  await net.logits(ids, B, T, logits);
  const losses = new Float32Array(B * T);
  const ev = await net.loss(ids, targets, B, T, losses);
  await net.forwardBackward(ids, targets, B, T, 1 / ev.count, 0);
  const cache = net.createCache(2, T);
  const dec = new Float32Array(2 * V);
  await net.prefill(cache, 0, ids.subarray(0, T - 1), dec);
  await net.prefill(cache, 1, ids.subarray(T, T + 3), dec.subarray(V));
  await net.decode(cache, Int32Array.of(0, 1), Int32Array.of(ids[T - 1], ids[T + 3]), dec);
  net.dispose();
  return { logits, losses, lossSum: ev.lossSum, grads, dec };
}

describe('stitched model over mapped weights', () => {
  const hub = weightsOf(randomModel(c, 81));
  const e0 = bf16Of(weightsOf(randomModel(c, 82)));
  const e1 = weightsOf(randomModel(c, 83));

  it('gives bit-identical logits, losses, gradients and decode logits to the same arrays', async () => {
    const want = await outputs(hub, [e0, e1]);
    const h = writeAndMap('hub.safetensors', hub);
    const m0 = writeAndMap('e0.safetensors', e0);
    const m1 = writeAndMap('e1.safetensors', e1);
    // every model mapped, and a mix of mapped and in-memory models; file handles disposed right after
    // creation in the second run
    const runs = [
      await outputs(h.weights, [m0.weights, m1.weights]),
      await outputs(h.weights, [e0, m1.weights], () => [h, m0, m1].forEach((m) => m.mf.dispose())),
    ];
    for (const got of runs) {
      expect(Array.from(got.logits)).toEqual(Array.from(want.logits));
      expect(Array.from(got.losses)).toEqual(Array.from(want.losses));
      expect(got.lossSum).toBe(want.lossSum);
      for (const k of tensors.keys()) expect(Array.from(got.grads[k]), k).toEqual(Array.from(want.grads[k]));
      expect(Array.from(got.dec)).toEqual(Array.from(want.dec));
    }
    // the check is not vacuous: other weights give other logits
    const other = await outputs(hub, [e1, e0]);
    expect(Array.from(other.logits)).not.toEqual(Array.from(want.logits));
  });

  it('refuses a disposed file, a tensor outside the file and a look-alike file, naming the model and tensor', () => {
    const { mf, weights } = writeAndMap('bad.safetensors', e1);
    const q = 'model.layers.1.self_attn.q_proj.weight';
    const w = weights[q] as Extract<NativeWeight, { file: unknown }>;
    const create = (e: Record<string, NativeWeight>) => stitchedCreate(c, hub, [e0, e], spec, Object.fromEntries(tensors), null);
    expect(() => create({ ...weights, [q]: { ...w, offset: mf.byteLength - 8 } })).toThrow(ArgumentError);
    expect(() => create({ ...weights, [q]: { ...w, offset: mf.byteLength - 8 } })).toThrow(/experts\[1\]\['model.layers.1.self_attn.q_proj.weight'\]: bytes .* lie outside the file/);
    expect(() => create({ ...weights, [q]: { ...w, file: { byteLength: mf.byteLength, path: mf.path } as NativeMappedFile } })).toThrow(
      /experts\[1\]\['model.layers.1.self_attn.q_proj.weight'\]\.file must be a NativeMappedFile/,
    );
    mf.dispose();
    expect(() => create(weights)).toThrow(DisposedError);
  });
});
