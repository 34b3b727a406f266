import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { FormatError, ShapeError, DTypeError, DisposedError } from '../../lib/errors.js';
import {
  SAFETENSORS_DTYPES,
  DTYPE_SIZE,
  bf16ToF32,
  f16BitsToF32,
  f16ToF32,
  f32ToBf16,
  f32ToBf16Bits,
  f32ToF16,
  f32ToF16Bits,
  findDuplicateJsonKey,
  openSafetensors,
  openSafetensorsDir,
  openSafetensorsIndex,
  writeSafetensors,
  writeSafetensorsAsync,
  writeSafetensorsSharded,
  type SafetensorsDType,
  type TensorToWrite,
} from '../../lib/formats/safetensors.js';
import { writeFileAtomic, writeFileAtomicAsync } from '../../lib/formats/atomic.js';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bts-st-'));
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});
let n = 0;
const tmp = (name = 'f.safetensors'): string => path.join(dir, `${n++}-${name}`);

/** A file from a header (object or raw string) and data bytes; `headerLen` overrides N. */
function rawFile(header: unknown, data: Uint8Array = new Uint8Array(0), headerLen?: number): string {
  const text = typeof header === 'string' ? header : JSON.stringify(header);
  const h = Buffer.from(text, 'utf8');
  const head = Buffer.alloc(8);
  head.writeBigUInt64LE(BigInt(headerLen ?? h.length));
  const p = tmp();
  fs.writeFileSync(p, Buffer.concat([head, h, data]));
  return p;
}

function expectFormatError(fn: () => unknown, re: RegExp): void {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err, 'expected a FormatError').toBeInstanceOf(FormatError);
  expect((err as FormatError).code).toBe('E_FORMAT');
  expect((err as Error).message).toMatch(re);
}

describe('safetensors golden bytes (Rust crate tests)', () => {
  it('test_serialization: one F32 [1,2,3] tensor, N = 64', () => {
    const p = tmp();
    writeSafetensors(p, { 'attn.0': { dtype: 'F32', shape: [1, 2, 3], data: new Float32Array([0, 1, 2, 3, 4, 5]) } });
    const bytes = fs.readFileSync(p);
    const header = '{"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}}';
    expect(header.length).toBe(64);
    const expected = Buffer.concat([Buffer.from([64, 0, 0, 0, 0, 0, 0, 0]), Buffer.from(header), Buffer.from(new Float32Array([0, 1, 2, 3, 4, 5]).buffer)]);
    expect(bytes.equals(expected)).toBe(true);
    const f = openSafetensors(p);
    expect(f.headerLength).toBe(64);
    expect(Array.from(f.get('attn.0') as Float32Array)).toEqual([0, 1, 2, 3, 4, 5]);
    f.close();
  });

  it('test_serialization_forced_alignement: 65-byte header padded with 7 spaces to 72', () => {
    const p = tmp();
    writeSafetensors(p, { attn0: { dtype: 'F32', shape: [1, 1, 2, 3], data: new Float32Array(6) } });
    const bytes = fs.readFileSync(p);
    const header = '{"attn0":{"dtype":"F32","shape":[1,1,2,3],"data_offsets":[0,24]}}';
    expect(header.length).toBe(65);
    expect(bytes.readBigUInt64LE(0)).toBe(72n);
    expect(bytes.subarray(8, 80).toString()).toBe(header + ' '.repeat(7));
    expect(bytes.length).toBe(8 + 72 + 24);
    const f = openSafetensors(p);
    const v = f.get('attn0');
    expect(v.buffer).toBe((f.get('attn0') as Float32Array).buffer); // zero-copy: same backing buffer
    expect(v.byteOffset % 4).toBe(0);
    f.close();
  });

  it('empty file serializes as 8,0,..,"{}" + 6 spaces', () => {
    const p = tmp();
    writeSafetensors(p, {});
    expect(Array.from(fs.readFileSync(p))).toEqual([8, 0, 0, 0, 0, 0, 0, 0, 123, 125, 32, 32, 32, 32, 32, 32]);
    const f = openSafetensors(p);
    expect(f.tensors.size).toBe(0);
    expect(f.metadata).toEqual({});
  });
});

function sample(dtype: SafetensorsDType, count: number, seed: number): TensorToWrite['data'] {
  const bytes = new Uint8Array(count * DTYPE_SIZE[dtype]);
  let s = seed;
  for (let i = 0; i < bytes.length; i++) {
    s = (s * 1103515245 + 12345) >>> 0;
    bytes[i] = s >>> 24;
  }
  return bytes;
}

describe('safetensors round trips', () => {
  it('every dtype, rank-0 scalars, empty tensors, metadata; eager and lazy', () => {
    const tensors: Record<string, TensorToWrite> = {};
    SAFETENSORS_DTYPES.forEach((dt, i) => {
      tensors[`t.${dt}`] = { dtype: dt, shape: [3, i + 1], data: sample(dt, 3 * (i + 1), i) };
      tensors[`s.${dt}`] = { dtype: dt, shape: [], data: sample(dt, 1, 100 + i) };
      tensors[`e.${dt}`] = { dtype: dt, shape: [2, 0, 5], data: sample(dt, 0, 0) };
    });
    tensors.f32 = { dtype: 'F32', shape: [2, 2], data: new Float32Array([1.5, -2, 3, 1e-8]) };
    tensors.i64 = { dtype: 'I64', shape: [2], data: new BigInt64Array([-5n, 1n << 62n]) };
    const p = tmp();
    writeSafetensors(p, tensors, { format: 'pt', note: 'héllo ✓' });
    for (const load of ['eager', 'lazy'] as const) {
      const f = openSafetensors(p, { load });
      expect(f.load).toBe(load);
      expect(f.metadata).toEqual({ format: 'pt', note: 'héllo ✓' });
      expect(f.tensors.size).toBe(Object.keys(tensors).length);
      for (const [name, t] of Object.entries(tensors)) {
        const info = f.tensors.get(name)!;
        expect(info.dtype).toBe(t.dtype);
        expect(info.shape).toEqual(t.shape);
        const got = f.get(name);
        const gotBytes = new Uint8Array(got.buffer, got.byteOffset, got.byteLength);
        const want = new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength);
        expect(Buffer.from(gotBytes).equals(Buffer.from(want)), name).toBe(true);
        if (load === 'eager' && got.byteLength > 0) expect(got.byteOffset % DTYPE_SIZE[t.dtype]).toBe(0);
      }
      expect(f.get('t.F32')).toBeInstanceOf(Float32Array);
      expect(f.get('t.BF16')).toBeInstanceOf(Uint16Array);
      expect(f.get('t.I64')).toBeInstanceOf(BigInt64Array);
      expect(f.get('t.I8')).toBeInstanceOf(Int8Array);
      expect(f.get('t.U64')).toBeInstanceOf(BigUint64Array);
      expect(Array.from(f.get('i64') as BigInt64Array)).toEqual([-5n, 1n << 62n]);
      expect(f.get('s.F32').length).toBe(1);
      expect(f.get('e.F64').length).toBe(0);
      expect(Array.from(f.getF32('f32'))).toEqual(Array.from(new Float32Array([1.5, -2, 3, 1e-8])));
      expect(() => f.getF32('t.I32')).toThrow(DTypeError);
      expectFormatError(() => f.get('nope'), /no tensor named "nope"/);
      f.close();
      expect(() => f.get('f32')).toThrow(DisposedError);
    }
  });

  it('writer orders by descending dtype then name, offsets contiguous', () => {
    const p = tmp();
    writeSafetensors(p, {
      b8: { dtype: 'U8', shape: [3], data: new Uint8Array(3) },
      a16: { dtype: 'BF16', shape: [1], data: new Uint16Array(1) },
      z32: { dtype: 'F32', shape: [1], data: new Float32Array(1) },
      a32: { dtype: 'F32', shape: [2], data: new Float32Array(2) },
      c64: { dtype: 'F64', shape: [1], data: new Float64Array(1) },
    });
    const f = openSafetensors(p);
    expect([...f.tensors.keys()]).toEqual(['c64', 'a32', 'z32', 'a16', 'b8']);
    const offs = [...f.tensors.values()].map((t) => t.byteOffset - 8 - f.headerLength);
    expect(offs).toEqual([0, 8, 16, 20, 22]);
  });

  it('getF32 converts BF16 and F16', () => {
    const x = new Float32Array([0, 1, -2.5, 3.140625, 65504, 1e-3]);
    const p = tmp();
    writeSafetensors(p, {
      b: { dtype: 'BF16', shape: [6], data: f32ToBf16(x) },
      h: { dtype: 'F16', shape: [2, 3], data: f32ToF16(x) },
    });
    const f = openSafetensors(p);
    const b = f.getF32('b');
    const h = f.getF32('h');
    for (let i = 0; i < x.length; i++) {
      expect(Math.abs(b[i] - x[i])).toBeLessThanOrEqual(Math.abs(x[i]) * 2 ** -8);
      expect(Math.abs(h[i] - x[i])).toBeLessThanOrEqual(Math.abs(x[i]) * 2 ** -11 + 2 ** -25);
    }
    expect(h[4]).toBe(65504);
  });

  it('writer validation: data length vs shape, dtype vs array type', () => {
    const p = tmp();
    expect(() => writeSafetensors(p, { a: { dtype: 'F32', shape: [2, 3], data: new Float32Array(5) } })).toThrow(ShapeError);
    expect(() => writeSafetensors(p, { a: { dtype: 'BF16', shape: [4], data: new Float32Array(2) } })).toThrow(DTypeError);
    expect(() => writeSafetensors(p, { a: { dtype: 'F99' as SafetensorsDType, shape: [1], data: new Float32Array(1) } })).toThrow(DTypeError);
    expect(() => writeSafetensors(p, { a: { dtype: 'F32', shape: [-1], data: new Float32Array(1) } })).toThrow(ShapeError);
    expect(fs.existsSync(p)).toBe(false);
    expect(fs.readdirSync(dir).filter((f) => f.endsWith('.tmp'))).toEqual([]);
  });

  it('async writer produces the same bytes', async () => {
    const t = { w: { dtype: 'F32' as const, shape: [2], data: new Float32Array([1, 2]) }, u: { dtype: 'U8' as const, shape: [1], data: new Uint8Array([7]) } };
    const p1 = tmp();
    const p2 = tmp();
    writeSafetensors(p1, t, { a: 'b' });
    await writeSafetensorsAsync(p2, t, { a: 'b' });
    expect(fs.readFileSync(p1).equals(fs.readFileSync(p2))).toBe(true);
  });
});

describe('sharded safetensors', () => {
  const tensors: Record<string, TensorToWrite> = {};
  for (let i = 0; i < 7; i++) tensors[`model.layers.${i}.w`] = { dtype: 'F32', shape: [10, 10], data: new Float32Array(100).fill(i) };
  tensors['model.norm.weight'] = { dtype: 'BF16', shape: [10], data: f32ToBf16(new Float32Array(10).fill(0.5)) };

  it('round trip through the index', () => {
    const d = fs.mkdtempSync(path.join(dir, 'shard-'));
    const r = writeSafetensorsSharded(d, tensors, { maxShardBytes: 1000 });
    expect(r.files.map((f) => path.basename(f))).toEqual([
      'model-00001-of-00004.safetensors',
      'model-00002-of-00004.safetensors',
      'model-00003-of-00004.safetensors',
      'model-00004-of-00004.safetensors',
    ]);
    expect(r.totalSize).toBe(7 * 400 + 20);
    const idx = JSON.parse(fs.readFileSync(r.indexPath, 'utf8'));
    expect(idx.metadata.total_size).toBe(r.totalSize);
    expect(Object.keys(idx.weight_map)).toEqual(Object.keys(tensors).sort());
    for (const v of [openSafetensorsIndex(d), openSafetensorsIndex(r.indexPath), openSafetensorsDir(d)]) {
      expect(v.tensors.size).toBe(8);
      for (let i = 0; i < 7; i++) expect(Array.from(v.getF32(`model.layers.${i}.w`)).every((x) => x === i)).toBe(true);
      expect(Array.from(v.getF32('model.norm.weight'))).toEqual(new Array(10).fill(0.5));
      expect(v.metadata).toEqual({ format: 'pt' });
      v.close();
    }
  });

  it('index errors: tensor missing from its shard, tensor in two shards, tensor not in weight_map', () => {
    const d = fs.mkdtempSync(path.join(dir, 'shard-'));
    writeSafetensors(path.join(d, 'a.safetensors'), { x: { dtype: 'F32', shape: [1], data: new Float32Array(1) } });
    writeSafetensors(path.join(d, 'b.safetensors'), { x: { dtype: 'F32', shape: [1], data: new Float32Array(1) }, y: { dtype: 'F32', shape: [1], data: new Float32Array(1) } });
    const idx = (wm: Record<string, string>): string => {
      const p = path.join(d, `i${n++}.json`);
      fs.writeFileSync(p, JSON.stringify({ weight_map: wm }));
      return p;
    };
    expectFormatError(() => openSafetensorsIndex(idx({ x: 'a.safetensors', z: 'a.safetensors' })), /puts "z" in a\.safetensors, but that shard has no such tensor/);
    expectFormatError(() => openSafetensorsIndex(idx({ x: 'a.safetensors', y: 'b.safetensors' })), /"x" is in two shards: a\.safetensors and b\.safetensors/);
    expectFormatError(() => openSafetensorsIndex(idx({ x: 'b.safetensors' })), /holds "y", which weight_map does not assign/);
    expectFormatError(() => openSafetensorsIndex(idx({ x: '../a.safetensors' })), /relative path/);
    const noMeta = openSafetensorsIndex(idx({ x: 'b.safetensors', y: 'b.safetensors' }));
    expect(noMeta.indexMetadata).toEqual({});
    noMeta.close();
  });
});

describe('safetensors corruption suite', () => {
  const good = { w: { dtype: 'F32', shape: [2], data_offsets: [0, 8] } };
  const eight = new Uint8Array(8);

  it('accepts the well-formed baseline', () => {
    expect(openSafetensors(rawFile(good, eight)).tensors.get('w')!.byteLength).toBe(8);
  });
  it('file shorter than 8 bytes', () => {
    const p = tmp();
    fs.writeFileSync(p, Buffer.from([1, 2, 3]));
    expectFormatError(() => openSafetensors(p), /3 bytes, shorter than the 8-byte header length/);
  });
  it('truncated file (data cut short)', () => {
    expectFormatError(() => openSafetensors(rawFile(good, new Uint8Array(5))), /truncated: tensors need .* file has/);
  });
  it('truncated header', () => {
    expectFormatError(() => openSafetensors(rawFile(good, eight, 500)), /header length 500 \+ 8 exceeds the file size/);
  });
  it('header length over 100,000,000', () => {
    expectFormatError(() => openSafetensors(rawFile(good, eight, 100_000_001)), /exceeds the limit of 100000000/);
  });
  it('bad JSON', () => {
    expectFormatError(() => openSafetensors(rawFile('{"w": {"dtype": "F32",', eight)), /not valid JSON/);
  });
  it('invalid UTF-8', () => {
    const p = tmp();
    const h = Buffer.from([0x7b, 0xff, 0x7d]);
    const head = Buffer.alloc(8);
    head.writeBigUInt64LE(3n);
    fs.writeFileSync(p, Buffer.concat([head, h]));
    expectFormatError(() => openSafetensors(p), /not valid UTF-8/);
  });
  it('header not an object', () => {
    expectFormatError(() => openSafetensors(rawFile('[1,2]')), /must be a JSON object, got an array/);
  });
  it('non-string metadata', () => {
    expectFormatError(() => openSafetensors(rawFile({ __metadata__: { step: 5 }, ...good }, eight)), /__metadata__\["step"\] must be a string, got number/);
  });
  it('overlapping offsets', () => {
    const h = { a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] }, b: { dtype: 'F32', shape: [2], data_offsets: [4, 12] } };
    expectFormatError(() => openSafetensors(rawFile(h, new Uint8Array(12))), /"b" \[4, 12\) overlaps "a" which ends at 8/);
  });
  it('gap between tensors', () => {
    const h = { a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] }, b: { dtype: 'F32', shape: [1], data_offsets: [12, 16] } };
    expectFormatError(() => openSafetensors(rawFile(h, new Uint8Array(16))), /gap of 4 bytes before tensor "b"/);
  });
  it('gap at the start', () => {
    const h = { a: { dtype: 'F32', shape: [1], data_offsets: [4, 8] } };
    expectFormatError(() => openSafetensors(rawFile(h, eight)), /gap of 4 bytes before tensor "a"/);
  });
  it('wrong byte length for the shape', () => {
    const h = { w: { dtype: 'F32', shape: [3], data_offsets: [0, 8] } };
    expectFormatError(() => openSafetensors(rawFile(h, eight)), /span 8 bytes, but shape \[3\] of F32 needs 12/);
  });
  it('huge shape product does not overflow into a match', () => {
    const h = { w: { dtype: 'F32', shape: [2 ** 52, 2 ** 52, 0x10000], data_offsets: [0, 8] } };
    expectFormatError(() => openSafetensors(rawFile(h, eight)), /needs \d{30,}/);
  });
  it('unknown dtype', () => {
    expectFormatError(() => openSafetensors(rawFile({ w: { dtype: 'F128', shape: [1], data_offsets: [0, 8] } }, eight)), /unknown dtype "F128"/);
  });
  it('bad shape / offsets entries', () => {
    expectFormatError(() => openSafetensors(rawFile({ w: { dtype: 'F32', shape: [-2], data_offsets: [0, 8] } }, eight)), /shape must be an array of non-negative integers/);
    expectFormatError(() => openSafetensors(rawFile({ w: { dtype: 'F32', shape: [2], data_offsets: [8, 0] } }, eight)), /begin > end/);
    expectFormatError(() => openSafetensors(rawFile({ w: { dtype: 'F32', shape: [2] } }, eight)), /data_offsets must be \[begin, end\]/);
  });
  it('trailing bytes', () => {
    expectFormatError(() => openSafetensors(rawFile(good, new Uint8Array(9))), /1 trailing bytes after the last tensor/);
  });
  it('duplicate key (JSON.parse would silently keep the last)', () => {
    const text = '{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}';
    expectFormatError(() => openSafetensors(rawFile(text, eight)), /duplicate key "w"/);
    const nested = '{"w":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}';
    expectFormatError(() => openSafetensors(rawFile(nested, eight)), /duplicate key "w.dtype"/);
  });
  it('duplicate-key scanner handles escapes and arrays', () => {
    expect(findDuplicateJsonKey('{"a\\"b":[{"x":1},{"x":2}],"c":"a\\\\"}')).toBeNull();
    expect(findDuplicateJsonKey('{"a":{"b":"x"},"a\\u0062":1,"ab":2}')).toBe('ab');
  });
  it('empty tensors and scalars at shared offsets are fine', () => {
    const h = { e: { dtype: 'F32', shape: [0, 3], data_offsets: [0, 0] }, s: { dtype: 'F64', shape: [], data_offsets: [0, 8] }, e2: { dtype: 'U8', shape: [0], data_offsets: [8, 8] } };
    const f = openSafetensors(rawFile(h, eight));
    expect(f.get('e').length).toBe(0);
    expect(f.get('s').length).toBe(1);
  });
});

describe('bf16 / f16 conversion', () => {
  it('f32 -> bf16 rounds to nearest even, keeps NaN/Inf', () => {
    const u = new Uint32Array(1);
    const f = new Float32Array(u.buffer);
    const cases: [number, number][] = [
      [0x3f800000, 0x3f80], // 1.0
      [0x3f808000, 0x3f80], // exactly half, even -> down
      [0x3f818000, 0x3f82], // exactly half, odd -> up
      [0x3f808001, 0x3f81], // above half -> up
      [0x7f7fffff, 0x7f80], // max float rounds to Inf
      [0xff800000, 0xff80], // -Inf
    ];
    for (const [bits, want] of cases) {
      u[0] = bits;
      expect(f32ToBf16Bits(f[0])).toBe(want);
      expect(f32ToBf16(new Float32Array([f[0]]))[0]).toBe(want);
    }
    expect(Number.isNaN(bf16ToF32(f32ToBf16(new Float32Array([NaN])))[0])).toBe(true);
    // bf16 -> f32 -> bf16 is the identity for every non-NaN pattern.
    const all = new Uint16Array(65536).map((_, i) => i);
    const back = f32ToBf16(bf16ToF32(all));
    const bad: number[] = [];
    for (let i = 0; i < 65536; i++) if (((i & 0x7f80) !== 0x7f80 || (i & 0x7f) === 0) && back[i] !== i) bad.push(i);
    expect(bad).toEqual([]);
  });

  it('f16 <-> f32 is exact for every half value, rounding ties to even', () => {
    const all = new Uint16Array(65536).map((_, i) => i);
    const f = f16ToF32(all);
    const bad: number[] = [];
    for (let i = 0; i < 65536; i++) {
      const isNaNBits = (i & 0x7c00) === 0x7c00 && (i & 0x3ff) !== 0;
      if (isNaNBits ? !Number.isNaN(f[i]) : f[i] !== f16BitsToF32(i) || f32ToF16Bits(f[i]) !== i) bad.push(i);
    }
    expect(bad).toEqual([]);
    expect(f[0x3c00]).toBe(1);
    expect(f[0x0001]).toBe(2 ** -24);
    expect(f[0xfbff]).toBe(-65504);
    expect(f32ToF16Bits(65520)).toBe(0x7c00); // halfway to the next (absent) value -> Inf
    expect(f32ToF16Bits(65519)).toBe(0x7bff);
    expect(f32ToF16Bits(2 ** -25)).toBe(0); // tie between 0 and the smallest subnormal -> even (0)
    expect(f32ToF16Bits(2 ** -25 * 1.5)).toBe(1);
    expect(f32ToF16Bits(1 + 2 ** -11)).toBe(0x3c00); // tie -> even
    expect(f32ToF16Bits(1 + 3 * 2 ** -11)).toBe(0x3c02);
  });
});

describe('atomic writes', () => {
  it('writes chunks, replaces the target, leaves no temp file', async () => {
    const p = tmp('a.bin');
    fs.writeFileSync(p, 'old');
    writeFileAtomic(p, ['ab', new Uint8Array([99]), new Uint16Array([0x6564])]);
    expect(fs.readFileSync(p, 'utf8')).toBe('abcde');
    await writeFileAtomicAsync(p, (async function* () {
      yield 'x';
      yield new Uint8Array([121]);
    })());
    expect(fs.readFileSync(p, 'utf8')).toBe('xy');
    expect(fs.readdirSync(dir).filter((f) => f.endsWith('.tmp'))).toEqual([]);
  });

  it('on failure the target is untouched and the temp file removed', async () => {
    const p = tmp('b.bin');
    fs.writeFileSync(p, 'keep');
    expect(() => writeFileAtomic(p, [new Uint8Array(2), 5 as unknown as Uint8Array])).toThrow();
    await expect(
      writeFileAtomicAsync(p, (async function* () {
        yield 'partial';
        throw new Error('source failed');
      })()),
    ).rejects.toThrow('source failed');
    expect(fs.readFileSync(p, 'utf8')).toBe('keep');
    expect(fs.readdirSync(dir).filter((f) => f.endsWith('.tmp'))).toEqual([]);
  });
});
