// Memory-mapped weights: a safetensors file written by the lib writer, mapped with mapFile and passed
// as {file, offset, dtype, length}, gives exactly the logits of the same weights passed as arrays
// (fp32 and bf16). Bad offsets, lengths, dtypes and disposed files are typed errors; a model keeps
// its mapping alive after the file handle is disposed.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ArgumentError, DTypeError, DisposedError, ShapeError, llamaTensorNames, openSafetensors, writeSafetensors, type TensorToWrite } from '../../lib/index.js';
import { llamaCreate, mapFile, type NativeWeight } from '../../lib/engine/native.js';
import { native } from '../../lib/native.js';
import { randIds } from '../helpers.js';
import { bf16Weights, randomTensors, record, smallConfig } from './helpers.js';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bts-engine-map-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

describe('mapped weights', () => {
  const config = smallConfig();
  const V = config.vocabSize;
  const tensors = randomTensors(config, 51);
  const B = 2;
  const T = 9;
  const ids = randIds(B * T, V, 52);

  async function logits(weights: Record<string, NativeWeight>): Promise<Float32Array> {
    const m = llamaCreate(config, weights, null);
    const out = new Float32Array(B * T * V);
    await m.logits(ids, B, T, out);
    m.dispose();
    return out;
  }

  /** Writes `arrays` as one safetensors file; returns the mapped weights record. */
  function writeAndMap(file: string, arrays: Record<string, Float32Array | Uint16Array>) {
    const specs = new Map(llamaTensorNames(config).map((s) => [s.name, s.shape]));
    const out: Record<string, TensorToWrite> = {};
    for (const [name, a] of Object.entries(arrays)) out[name] = { dtype: a instanceof Uint16Array ? 'BF16' : 'F32', shape: specs.get(name)!, data: a };
    writeSafetensors(file, out);
    const mf = mapFile(file);
    expect(mf.byteLength).toBe(fs.statSync(file).size);
    const weights: Record<string, NativeWeight> = {};
    using st = openSafetensors(file, { load: 'lazy' });
    for (const [name, info] of st.tensors) {
      const dtype = info.dtype === 'BF16' ? ('bf16' as const) : ('f32' as const);
      weights[name] = { file: mf, offset: info.byteOffset, dtype, length: info.byteLength / (dtype === 'bf16' ? 2 : 4) };
    }
    return { mf, weights };
  }

  it('fp32 and bf16 mapped weights give the logits of the same arrays, bit for bit', async () => {
    const { mf, weights } = writeAndMap(path.join(dir, 'f32.safetensors'), record(tensors));
    const want = await logits(record(tensors));
    expect(Array.from(await logits(weights))).toEqual(Array.from(want));
    mf.dispose();

    const { weights: b16 } = bf16Weights(tensors, (n) => !n.endsWith('norm.weight'));
    const { mf: mf2, weights: mapped2 } = writeAndMap(path.join(dir, 'bf16.safetensors'), b16);
    expect(Array.from(await logits(mapped2))).toEqual(Array.from(await logits(b16)));
    mf2.dispose();
  });

  it('a model keeps its mapping after the file handle is disposed', async () => {
    const { mf, weights } = writeAndMap(path.join(dir, 'keep.safetensors'), record(tensors));
    const m = llamaCreate(config, weights, null);
    mf.dispose();
    mf.dispose(); // idempotent
    const out = new Float32Array(B * T * V);
    await m.logits(ids, B, T, out);
    expect(Array.from(out)).toEqual(Array.from(await logits(record(tensors))));
    m.dispose();
    // the disposed handle cannot make new models
    expect(() => llamaCreate(config, weights, null)).toThrow(DisposedError);
  });

  it('bad offsets, lengths, dtypes and files are typed errors', () => {
    const { mf, weights } = writeAndMap(path.join(dir, 'bad.safetensors'), record(tensors));
    const name = 'model.layers.0.mlp.up_proj.weight';
    const w = weights[name] as { file: typeof mf; offset: number; dtype: 'f32' | 'bf16'; length: number };
    const withW = (x: unknown) => ({ ...weights, [name]: x as NativeWeight });
    // past the end of the file (names the file size)
    expect(() => llamaCreate(config, withW({ ...w, offset: mf.byteLength - 8 }), null)).toThrow(ArgumentError);
    expect(() => llamaCreate(config, withW({ ...w, offset: mf.byteLength - 8 }), null)).toThrow(/outside the file/);
    // misaligned for f32
    expect(() => llamaCreate(config, withW({ ...w, offset: w.offset + 2 }), null)).toThrow(/not a multiple of the f32 element size/);
    // wrong length / dtype / offset type
    expect(() => llamaCreate(config, withW({ ...w, length: w.length - 1 }), null)).toThrow(ShapeError);
    expect(() => llamaCreate(config, withW({ ...w, dtype: 'f16' }), null)).toThrow(DTypeError);
    expect(() => llamaCreate(config, withW({ ...w, offset: -4 }), null)).toThrow(ArgumentError);
    expect(() => llamaCreate(config, withW({ ...w, offset: 1.5 }), null)).toThrow(ArgumentError);
    expect(() => llamaCreate(config, withW({ ...w, file: {} }), null)).toThrow(ArgumentError);
    // the same through the raw addon (native checks, typed codes)
    const raw = native();
    const code = (fn: () => unknown) => {
      try {
        fn();
      } catch (e) {
        return (e as { code?: string }).code;
      }
      return 'no error';
    };
    expect(code(() => raw.llamaCreate(config, withW({ ...w, offset: mf.byteLength }), null))).toBe('E_ARGUMENT');
    expect(code(() => raw.llamaCreate(config, withW({ ...w, offset: w.offset + 1 }), null))).toBe('E_ARGUMENT');
    expect(code(() => raw.llamaCreate(config, withW({ ...w, length: w.length + 1 }), null))).toBe('E_SHAPE');
    expect(code(() => raw.llamaCreate(config, withW({ ...w, dtype: 'i32' }), null))).toBe('E_DTYPE');
    expect(code(() => raw.llamaCreate(config, withW({ ...w, file: new Float32Array(4) }), null))).toBe('E_ARGUMENT');
    const empty = path.join(dir, 'empty.bin');
    fs.writeFileSync(empty, '');
    const e = mapFile(empty);
    expect(e.byteLength).toBe(0);
    expect(() => llamaCreate(config, withW({ ...w, file: e, offset: 0 }), null)).toThrow(/outside the file/);
    e.dispose();
    mf.dispose();
    expect(code(() => raw.llamaCreate(config, weights, null))).toBe('E_DISPOSED');
    // files that cannot be mapped
    expect(() => mapFile(path.join(dir, 'does-not-exist.safetensors'))).toThrow(ArgumentError);
    expect(() => mapFile(dir)).toThrow(/not a regular file/);
  });
});
