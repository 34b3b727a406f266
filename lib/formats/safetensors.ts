/**
 * Safetensors reader and writer, pure TypeScript (layout: /work/shared/PACKAGING.md 6.1, after
 * huggingface/safetensors `tensor.rs`).
 *
 * ```
 * [0..8)      N: u64 little-endian, byte length of the JSON header
 * [8..8+N)    UTF-8 JSON header, padded with spaces to N % 8 == 0 by writers
 * [8+N..EOF)  byte buffer: tensors contiguous, row-major, little-endian, no strides
 * ```
 *
 * Why it is shaped this way:
 * - Node has no mmap built-in. The default `load: 'eager'` reads the whole file into one Buffer with
 *   a single allocation and hands out zero-copy typed views into it (aligned, because writers pad the
 *   header to 8 bytes and sort tensors by descending dtype size). `load: 'lazy'` keeps the file open
 *   and reads each tensor on demand into its own buffer: for files over Node's Buffer limit (4 GiB on
 *   Node 20) or when only a few tensors are needed. A true mmap may come later with the native engine;
 *   the {@link SafetensorsView} interface will not change.
 * - The header is validated completely before any tensor is handed out (the rules of the Rust crate:
 *   header size, UTF-8, JSON object, string-only `__metadata__`, known dtypes, byte length ==
 *   prod(shape) * size with checked arithmetic, contiguous offsets from 0 without gaps or overlaps,
 *   no trailing bytes, no duplicate keys). Each failure is a {@link FormatError} naming the file and
 *   the fault.
 * - The writer is bit-compatible with the Rust crate: tensors sorted by descending dtype (the crate's
 *   enum order, which is by element size) then name, `__metadata__` first (keys sorted), header
 *   padded with spaces to a multiple of 8, written atomically (see ./atomic.ts).
 *
 * Known limits: big-endian hosts are not supported (typed views assume little-endian, as do all
 * current Node platforms). Sub-byte dtypes of newer crate versions (F4, F6_*, F8_E8M0) are rejected
 * as unknown. In eager mode a view aliases the file buffer: mutate it and you mutate what later `get`
 * calls return.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { constants as bufferConstants } from 'node:buffer';
import { DTypeError, DisposedError, FormatError, ShapeError } from '../errors.js';
import { writeFileAtomic, writeFileAtomicAsync } from './atomic.js';

// ---------------------------------------------------------------------------------------------------
// dtypes

/** The dtypes of the safetensors format, in the Rust crate's enum order (ascending element size). */
export const SAFETENSORS_DTYPES = [
  'BOOL',
  'U8',
  'I8',
  'F8_E5M2',
  'F8_E4M3',
  'I16',
  'U16',
  'F16',
  'BF16',
  'I32',
  'U32',
  'F32',
  'F64',
  'I64',
  'U64',
] as const;

/** A safetensors dtype name. */
export type SafetensorsDType = (typeof SAFETENSORS_DTYPES)[number];

/** Element size in bytes of each dtype. */
export const DTYPE_SIZE: Readonly<Record<SafetensorsDType, number>> = {
  BOOL: 1,
  U8: 1,
  I8: 1,
  F8_E5M2: 1,
  F8_E4M3: 1,
  I16: 2,
  U16: 2,
  F16: 2,
  BF16: 2,
  I32: 4,
  U32: 4,
  F32: 4,
  F64: 8,
  I64: 8,
  U64: 8,
};

const DTYPE_RANK: Record<string, number> = Object.fromEntries(SAFETENSORS_DTYPES.map((d, i) => [d, i]));

/** True when `s` names a dtype this module knows. */
export function isSafetensorsDType(s: unknown): s is SafetensorsDType {
  return typeof s === 'string' && Object.prototype.hasOwnProperty.call(DTYPE_RANK, s);
}

/**
 * The typed array `get` returns for each dtype. BF16 and F16 come as raw `Uint16Array` bits (use
 * `getF32` or {@link bf16ToF32} / {@link f16ToF32}); F8 variants and BOOL as raw `Uint8Array` bytes.
 */
export interface DTypeArrayMap {
  BOOL: Uint8Array;
  U8: Uint8Array;
  I8: Int8Array;
  F8_E5M2: Uint8Array;
  F8_E4M3: Uint8Array;
  I16: Int16Array;
  U16: Uint16Array;
  F16: Uint16Array;
  BF16: Uint16Array;
  I32: Int32Array;
  U32: Uint32Array;
  F32: Float32Array;
  F64: Float64Array;
  I64: BigInt64Array;
  U64: BigUint64Array;
}

/** Any typed array a tensor can be viewed as. */
export type TensorArray = DTypeArrayMap[SafetensorsDType];

type ArrayCtor = { new (buffer: ArrayBufferLike, byteOffset: number, length: number): TensorArray; new (length: number): TensorArray };

const CTOR: Record<SafetensorsDType, ArrayCtor> = {
  BOOL: Uint8Array,
  U8: Uint8Array,
  I8: Int8Array,
  F8_E5M2: Uint8Array,
  F8_E4M3: Uint8Array,
  I16: Int16Array,
  U16: Uint16Array,
  F16: Uint16Array,
  BF16: Uint16Array,
  I32: Int32Array,
  U32: Uint32Array,
  F32: Float32Array,
  F64: Float64Array,
  I64: BigInt64Array,
  U64: BigUint64Array,
} as unknown as Record<SafetensorsDType, ArrayCtor>;

// ---------------------------------------------------------------------------------------------------
// bf16 / f16 conversion

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

/** One float32 to bfloat16 bits, round to nearest even; NaN stays a (quiet) NaN with its sign. */
export function f32ToBf16Bits(x: number): number {
  f32Scratch[0] = x;
  const b = u32Scratch[0];
  if ((b & 0x7fffffff) > 0x7f800000) return ((b >>> 16) | 0x0040) & 0xffff;
  return ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) & 0xffff;
}

/** One bfloat16 (bits) to a number (exact). */
export function bf16BitsToF32(h: number): number {
  u32Scratch[0] = (h & 0xffff) << 16;
  return f32Scratch[0];
}

/** One float32 to IEEE binary16 bits, round to nearest even (overflow -> ±Inf, underflow -> ±0 or subnormal). */
export function f32ToF16Bits(x: number): number {
  f32Scratch[0] = x;
  const b = u32Scratch[0];
  const sign = (b >>> 16) & 0x8000;
  const exp = (b >>> 23) & 0xff;
  let mant = b & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant !== 0 ? 0x200 | (mant >>> 13) : 0);
  const e = exp - 127 + 15;
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let half = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const halfway = 1 << (shift - 1);
    if (rem > halfway || (rem === halfway && (half & 1) !== 0)) half++;
    return sign | half;
  }
  let half = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (half & 1) !== 0)) half++; // a carry into the exponent is correct (-> Inf at the top)
  return sign | half;
}

/** One IEEE binary16 (bits) to a number (exact). */
export function f16BitsToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

let f16Table: Float32Array | undefined;
function f16Lut(): Float32Array {
  if (!f16Table) {
    f16Table = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) f16Table[h] = f16BitsToF32(h);
  }
  return f16Table;
}

function outArray<T extends Float32Array | Uint16Array>(op: string, out: T | undefined, n: number, Ctor: new (n: number) => T): T {
  if (out === undefined) return new Ctor(n);
  if (out.length !== n) throw new ShapeError(`${op}: out has ${out.length} elements, expected ${n} (the input length)`);
  return out;
}

/** bfloat16 bits [n] -> float32 [n] (exact). `out` is allocated when omitted. */
export function bf16ToF32(src: Uint16Array, out?: Float32Array): Float32Array {
  const o = outArray('bf16ToF32', out, src.length, Float32Array);
  const u = new Uint32Array(o.buffer, o.byteOffset, o.length);
  for (let i = 0; i < src.length; i++) u[i] = src[i] << 16;
  return o;
}

/** float32 [n] -> bfloat16 bits [n], round to nearest even, NaN preserved. `out` is allocated when omitted. */
export function f32ToBf16(src: Float32Array, out?: Uint16Array): Uint16Array {
  const o = outArray('f32ToBf16', out, src.length, Uint16Array);
  const u = new Uint32Array(src.buffer, src.byteOffset, src.length);
  for (let i = 0; i < src.length; i++) {
    const b = u[i];
    o[i] = (b & 0x7fffffff) > 0x7f800000 ? (b >>> 16) | 0x0040 : (b + 0x7fff + ((b >>> 16) & 1)) >>> 16;
  }
  return o;
}

/** IEEE binary16 bits [n] -> float32 [n] (exact, through a 256 KiB lookup table built on first use). */
export function f16ToF32(src: Uint16Array, out?: Float32Array): Float32Array {
  const o = outArray('f16ToF32', out, src.length, Float32Array);
  const t = f16Lut();
  for (let i = 0; i < src.length; i++) o[i] = t[src[i]];
  return o;
}

/** float32 [n] -> IEEE binary16 bits [n], round to nearest even. */
export function f32ToF16(src: Float32Array, out?: Uint16Array): Uint16Array {
  const o = outArray('f32ToF16', out, src.length, Uint16Array);
  for (let i = 0; i < src.length; i++) o[i] = f32ToF16Bits(src[i]);
  return o;
}

// ---------------------------------------------------------------------------------------------------
// reader

/** Where one tensor lives. */
export interface TensorInfo {
  dtype: SafetensorsDType;
  /** Row-major shape; `[]` for a scalar, may contain 0 (empty tensor). */
  shape: number[];
  /** Absolute byte offset of the data in `file` (8 + N + data_offsets[0]). */
  byteOffset: number;
  /** Byte length of the data (= prod(shape) * DTYPE_SIZE[dtype]). */
  byteLength: number;
  /** Path of the file that holds it (the shard, for sharded checkpoints). */
  file: string;
}

/** A read-only view of one safetensors file or of a sharded checkpoint. */
export interface SafetensorsView extends Disposable {
  /** The `__metadata__` string map (`{}` when absent). For a sharded checkpoint: that of the first shard. */
  readonly metadata: Readonly<Record<string, string>>;
  /** Name -> location, in file order (sorted by offset). */
  readonly tensors: ReadonlyMap<string, TensorInfo>;
  /** True when the tensor exists. */
  has(name: string): boolean;
  /**
   * The tensor's data as the typed array of its dtype (see {@link DTypeArrayMap}). Eager mode: a
   * zero-copy view into the file buffer when aligned (always, for files from conforming writers),
   * else a copy. Lazy mode: a fresh copy read from disk.
   * Throws FormatError (missing name) or DisposedError (after close()).
   */
  get(name: string): TensorArray;
  /**
   * The tensor as float32: F32 as with `get` (zero-copy in eager mode), BF16/F16/F64 converted into
   * a new Float32Array. Other dtypes throw DTypeError.
   */
  getF32(name: string): Float32Array;
  /** Releases the buffer / file descriptors. Later `get` calls throw DisposedError. Idempotent. */
  close(): void;
}

/** A single opened safetensors file. */
export interface SafetensorsFile extends SafetensorsView {
  /** The path it was opened from. */
  readonly path: string;
  /** Byte length of the JSON header (N). */
  readonly headerLength: number;
  /** Total file size in bytes. */
  readonly fileSize: number;
  /** How tensor data is read (see {@link OpenSafetensorsOptions.load}). */
  readonly load: 'eager' | 'lazy';
}

/** Options of {@link openSafetensors}. */
export interface OpenSafetensorsOptions {
  /**
   * 'eager': read the whole file into one Buffer now; `get` returns zero-copy views into it.
   * 'lazy': read and validate only the header now, keep the file open, read each tensor on `get`
   * (one copy per call). Default: 'eager' when the file fits in one Buffer (4 GiB on Node 20), else
   * 'lazy'. (Named for what it does: this is not an mmap; a true mmap may come with the native engine.)
   */
  load?: 'eager' | 'lazy';
}

/** Largest header the reader accepts, in bytes (the Rust crate's MAX_HEADER_SIZE). */
export const MAX_HEADER_SIZE = 100_000_000;

function fail(file: string, what: string): never {
  throw new FormatError(`safetensors file ${file}: ${what}`);
}

/**
 * Scans a JSON text (already known to be valid) for duplicate keys in any object, which JSON.parse
 * silently collapses. Returns the first duplicate as a dotted path, or null.
 */
export function findDuplicateJsonKey(text: string): string | null {
  const stack: { keys: Set<string>; path: string }[] = [];
  // For each open container: is it an object, and the key just read (to build paths).
  const isObj: boolean[] = [];
  let pendingKey: string | null = null;
  let i = 0;
  const n = text.length;
  while (i < n) {
    const c = text.charCodeAt(i);
    if (c === 0x22 /* " */) {
      let j = i + 1;
      while (j < n) {
        const d = text.charCodeAt(j);
        if (d === 0x5c /* \ */) j += 2;
        else if (d === 0x22) break;
        else j++;
      }
      const raw = text.slice(i, j + 1);
      i = j + 1;
      // A string is a key when it sits directly in an object and is followed by ':'.
      let k = i;
      while (k < n && (text[k] === ' ' || text[k] === '\t' || text[k] === '\n' || text[k] === '\r')) k++;
      if (isObj.length > 0 && isObj[isObj.length - 1] && text[k] === ':') {
        const key = JSON.parse(raw) as string;
        const top = stack[stack.length - 1];
        if (top.keys.has(key)) return top.path ? `${top.path}.${key}` : key;
        top.keys.add(key);
        pendingKey = key;
        i = k + 1;
      }
      continue;
    }
    if (c === 0x7b /* { */ || c === 0x5b /* [ */) {
      const parent = stack[stack.length - 1];
      const p = parent ? (pendingKey !== null ? (parent.path ? `${parent.path}.${pendingKey}` : pendingKey) : parent.path) : '';
      stack.push({ keys: new Set(), path: p });
      isObj.push(c === 0x7b);
      pendingKey = null;
    } else if (c === 0x7d /* } */ || c === 0x5d /* ] */) {
      stack.pop();
      isObj.pop();
      pendingKey = null;
    } else if (c === 0x2c /* , */) {
      pendingKey = null;
    }
    i++;
  }
  return null;
}

function isNonNegInt(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

interface ParsedHeader {
  metadata: Record<string, string>;
  tensors: Map<string, TensorInfo>;
}

/** Validates a header (bytes [8, 8+N) of a file of `fileSize` bytes) and returns its tensors. */
function parseHeader(file: string, headerBytes: Uint8Array, headerLength: number, fileSize: number): ParsedHeader {
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(headerBytes);
  } catch (e) {
    throw new FormatError(`safetensors file ${file}: header is not valid UTF-8`, { cause: e });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new FormatError(`safetensors file ${file}: header is not valid JSON (${(e as Error).message})`, { cause: e });
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    fail(file, `header must be a JSON object, got ${Array.isArray(json) ? 'an array' : json === null ? 'null' : typeof json}`);
  }
  const dup = findDuplicateJsonKey(text);
  if (dup !== null) fail(file, `duplicate key "${dup}" in the header`);

  const metadata: Record<string, string> = {};
  const entries: [string, TensorInfo, number, number][] = [];
  const dataStart = 8 + headerLength;
  for (const [name, value] of Object.entries(json as Record<string, unknown>)) {
    if (name === '__metadata__') {
      if (value === null) continue;
      if (typeof value !== 'object' || Array.isArray(value)) fail(file, `__metadata__ must be an object of strings, got ${Array.isArray(value) ? 'an array' : typeof value}`);
      for (const [k, v] of Object.entries(value as Record<string, unknown>)) {
        if (typeof v !== 'string') fail(file, `__metadata__["${k}"] must be a string, got ${v === null ? 'null' : typeof v} (${JSON.stringify(v)})`);
        metadata[k] = v;
      }
      continue;
    }
    if (typeof value !== 'object' || value === null || Array.isArray(value)) fail(file, `tensor "${name}": entry must be an object with dtype, shape, data_offsets`);
    const e = value as Record<string, unknown>;
    if (!isSafetensorsDType(e.dtype)) fail(file, `tensor "${name}": unknown dtype ${JSON.stringify(e.dtype)} (known: ${SAFETENSORS_DTYPES.join(', ')})`);
    const dtype = e.dtype;
    if (!Array.isArray(e.shape) || !e.shape.every(isNonNegInt)) fail(file, `tensor "${name}": shape must be an array of non-negative integers, got ${JSON.stringify(e.shape)}`);
    const shape = (e.shape as number[]).slice();
    const off = e.data_offsets;
    if (!Array.isArray(off) || off.length !== 2 || !off.every(isNonNegInt)) fail(file, `tensor "${name}": data_offsets must be [begin, end] non-negative integers, got ${JSON.stringify(off)}`);
    const [begin, end] = off as [number, number];
    if (begin > end) fail(file, `tensor "${name}": data_offsets [${begin}, ${end}] has begin > end`);
    let want = BigInt(DTYPE_SIZE[dtype]);
    for (const d of shape) want *= BigInt(d);
    if (want !== BigInt(end - begin)) {
      fail(file, `tensor "${name}": data_offsets [${begin}, ${end}] span ${end - begin} bytes, but shape [${shape.join(', ')}] of ${dtype} needs ${want}`);
    }
    entries.push([name, { dtype, shape, byteOffset: dataStart + begin, byteLength: end - begin, file }, begin, end]);
  }
  entries.sort((a, b) => a[2] - b[2] || a[3] - b[3]);
  let expected = 0;
  let prev = '';
  for (const [name, , begin, end] of entries) {
    if (begin < expected) fail(file, `tensor "${name}" [${begin}, ${end}) overlaps "${prev}" which ends at ${expected}`);
    if (begin > expected) fail(file, `gap of ${begin - expected} bytes before tensor "${name}" (data_offsets begin ${begin}, previous tensor ${prev ? `"${prev}" ` : ''}ends at ${expected})`);
    expected = end;
    prev = name;
  }
  if (dataStart + expected !== fileSize) {
    const d = fileSize - dataStart - expected;
    fail(file, d > 0 ? `${d} trailing bytes after the last tensor (file is ${fileSize} bytes, header and data end at ${dataStart + expected})` : `file truncated: tensors need ${dataStart + expected} bytes, file has ${fileSize}`);
  }
  return { metadata, tensors: new Map(entries.map(([n, t]) => [n, t])) };
}

function readFully(file: string, fd: number, buf: Uint8Array, position: number): void {
  let off = 0;
  while (off < buf.byteLength) {
    const r = fs.readSync(fd, buf, off, buf.byteLength - off, position + off);
    if (r === 0) fail(file, `unexpected end of file while reading ${buf.byteLength} bytes at offset ${position} (was the file changed after it was opened?)`);
    off += r;
  }
}

function viewOrCopy(buf: Uint8Array, info: TensorInfo): TensorArray {
  const Ctor = CTOR[info.dtype];
  const size = DTYPE_SIZE[info.dtype];
  const count = info.byteLength / size;
  const abs = buf.byteOffset + info.byteOffset;
  if (abs % size === 0) return new Ctor(buf.buffer, abs, count);
  const copy = new Ctor(count);
  new Uint8Array(copy.buffer).set(buf.subarray(info.byteOffset, info.byteOffset + info.byteLength));
  return copy;
}

function toF32(name: string, dtype: SafetensorsDType, a: TensorArray): Float32Array {
  switch (dtype) {
    case 'F32':
      return a as Float32Array;
    case 'BF16':
      return bf16ToF32(a as Uint16Array);
    case 'F16':
      return f16ToF32(a as Uint16Array);
    case 'F64':
      return Float32Array.from(a as Float64Array);
    default:
      throw new DTypeError(`getF32("${name}"): dtype ${dtype} is not a floating-point type (F32, BF16, F16, F64)`);
  }
}

/**
 * Opens and fully validates a safetensors file. Synchronous (a single read in eager mode).
 * @param file path of the `.safetensors` file.
 * @throws FormatError on any malformation, naming the file and the fault.
 */
export function openSafetensors(file: string, options: OpenSafetensorsOptions = {}): SafetensorsFile {
  let fd: number | undefined = fs.openSync(file, 'r');
  try {
    const fileSize = fs.fstatSync(fd).size;
    if (fileSize < 8) fail(file, `file is ${fileSize} bytes, shorter than the 8-byte header length`);
    const load = options.load ?? (fileSize <= bufferConstants.MAX_LENGTH ? 'eager' : 'lazy');
    if (load !== 'eager' && load !== 'lazy') throw new FormatError(`openSafetensors: options.load must be 'eager' or 'lazy', got ${JSON.stringify(load)}`);
    const head = new Uint8Array(8);
    readFully(file, fd, head, 0);
    const n64 = Buffer.from(head.buffer).readBigUInt64LE(0);
    if (n64 > BigInt(MAX_HEADER_SIZE)) fail(file, `header length ${n64} exceeds the limit of ${MAX_HEADER_SIZE} bytes`);
    const headerLength = Number(n64);
    if (8 + headerLength > fileSize) fail(file, `header length ${headerLength} + 8 exceeds the file size ${fileSize} (truncated file?)`);
    let buf: Uint8Array | undefined;
    let header: ParsedHeader;
    if (load === 'eager') {
      buf = Buffer.allocUnsafeSlow(fileSize); // not pooled: byteOffset 0, so alignment follows file offsets
      buf.set(head, 0);
      readFully(file, fd, buf.subarray(8), 8);
      fs.closeSync(fd);
      fd = undefined;
      header = parseHeader(file, buf.subarray(8, 8 + headerLength), headerLength, fileSize);
    } else {
      const hb = new Uint8Array(headerLength);
      readFully(file, fd, hb, 8);
      header = parseHeader(file, hb, headerLength, fileSize);
    }
    const openFd = fd;
    fd = undefined; // ownership passes to the returned object
    return makeFile(file, header, headerLength, fileSize, load, buf, openFd);
  } finally {
    if (fd !== undefined) fs.closeSync(fd);
  }
}

function makeFile(
  file: string,
  header: ParsedHeader,
  headerLength: number,
  fileSize: number,
  load: 'eager' | 'lazy',
  buffer: Uint8Array | undefined,
  fd: number | undefined,
): SafetensorsFile {
  let closed = false;
  const info = (name: string): TensorInfo => {
    if (closed) throw new DisposedError(`safetensors file ${file}`);
    const t = header.tensors.get(name);
    if (!t) throw new FormatError(`safetensors file ${file}: no tensor named "${name}"`);
    return t;
  };
  const get = (name: string): TensorArray => {
    const t = info(name);
    if (buffer) return viewOrCopy(buffer, t);
    const out = new CTOR[t.dtype](t.byteLength / DTYPE_SIZE[t.dtype]);
    readFully(file, fd!, new Uint8Array(out.buffer, 0, t.byteLength), t.byteOffset);
    return out;
  };
  const close = (): void => {
    if (closed) return;
    closed = true;
    buffer = undefined;
    if (fd !== undefined) fs.closeSync(fd);
  };
  return {
    path: file,
    headerLength,
    fileSize,
    load,
    metadata: header.metadata,
    tensors: header.tensors,
    has: (name) => header.tensors.has(name),
    get,
    getF32: (name) => toF32(name, info(name).dtype, get(name)),
    close,
    [Symbol.dispose]: close,
  };
}

// ---------------------------------------------------------------------------------------------------
// sharded checkpoints

/** The default index file name of a sharded checkpoint. */
export const SAFETENSORS_INDEX_NAME = 'model.safetensors.index.json';

/** A sharded checkpoint opened through its index. */
export interface SafetensorsIndexView extends SafetensorsView {
  /** Path of the index file. */
  readonly indexPath: string;
  /** The index's `metadata` object (e.g. `{ total_size }`), `{}` when absent. */
  readonly indexMetadata: Readonly<Record<string, unknown>>;
  /** The opened shards, in the order of their names. */
  readonly shards: readonly SafetensorsFile[];
}

/**
 * Opens a sharded checkpoint: reads `weight_map` of `model.safetensors.index.json` (`metadata` is
 * optional), opens each shard once and presents one merged view.
 * @param pathOrDir the index file, or a directory holding `model.safetensors.index.json`.
 * @throws FormatError when the index is malformed, a shard lacks a tensor the index assigns to it,
 *   a shard holds a tensor the index does not assign to it, or two shards hold the same name.
 */
export function openSafetensorsIndex(pathOrDir: string, options: OpenSafetensorsOptions = {}): SafetensorsIndexView {
  const indexPath = fs.statSync(pathOrDir).isDirectory() ? path.join(pathOrDir, SAFETENSORS_INDEX_NAME) : pathOrDir;
  const dir = path.dirname(indexPath);
  const bad = (what: string): never => {
    throw new FormatError(`safetensors index ${indexPath}: ${what}`);
  };
  let json: unknown;
  try {
    json = JSON.parse(fs.readFileSync(indexPath, 'utf8'));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code) throw e;
    throw new FormatError(`safetensors index ${indexPath}: not valid JSON (${(e as Error).message})`, { cause: e });
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) bad('must be a JSON object');
  const j = json as Record<string, unknown>;
  const wm = j.weight_map;
  if (typeof wm !== 'object' || wm === null || Array.isArray(wm)) bad('weight_map must be an object of tensor name -> shard file');
  const meta = j.metadata ?? {};
  if (typeof meta !== 'object' || meta === null || Array.isArray(meta)) bad('metadata must be an object when present');
  const byShard = new Map<string, string[]>();
  for (const [name, shard] of Object.entries(wm as Record<string, unknown>)) {
    if (typeof shard !== 'string' || shard === '') bad(`weight_map["${name}"] must be a file name, got ${JSON.stringify(shard)}`);
    const s = shard as string;
    if (path.isAbsolute(s) || s.split(/[\\/]/).includes('..')) bad(`weight_map["${name}"] = "${s}" must be a relative path inside ${dir}`);
    if (!byShard.has(s)) byShard.set(s, []);
    byShard.get(s)!.push(name);
  }
  const shardNames = [...byShard.keys()].sort();
  const shards: SafetensorsFile[] = [];
  try {
    const owner = new Map<string, SafetensorsFile>();
    for (const s of shardNames) {
      const f = openSafetensors(path.join(dir, s), options);
      shards.push(f);
      for (const name of f.tensors.keys()) {
        const prev = owner.get(name);
        if (prev) bad(`tensor "${name}" is in two shards: ${path.basename(prev.path)} and ${s}`);
        owner.set(name, f);
      }
      const assigned = new Set(byShard.get(s));
      for (const name of assigned) if (!f.tensors.has(name)) bad(`weight_map puts "${name}" in ${s}, but that shard has no such tensor`);
      for (const name of f.tensors.keys()) if (!assigned.has(name)) bad(`shard ${s} holds "${name}", which weight_map does not assign to it`);
    }
    const tensors = new Map<string, TensorInfo>();
    for (const f of shards) for (const [n, t] of f.tensors) tensors.set(n, t);
    const shardOf = (name: string): SafetensorsFile => {
      const f = owner.get(name);
      if (!f) throw new FormatError(`safetensors index ${indexPath}: no tensor named "${name}"`);
      return f;
    };
    const close = (): void => {
      for (const f of shards) f.close();
    };
    return {
      indexPath,
      indexMetadata: meta as Record<string, unknown>,
      shards,
      metadata: shards[0]?.metadata ?? {},
      tensors,
      has: (name) => owner.has(name),
      get: (name) => shardOf(name).get(name),
      getF32: (name) => shardOf(name).getF32(name),
      close,
      [Symbol.dispose]: close,
    };
  } catch (e) {
    for (const f of shards) f.close();
    throw e;
  }
}

/**
 * Opens the weights of a model directory: the sharded index when `model.safetensors.index.json`
 * exists, else `model.safetensors`.
 */
export function openSafetensorsDir(dir: string, options: OpenSafetensorsOptions = {}): SafetensorsView {
  if (fs.existsSync(path.join(dir, SAFETENSORS_INDEX_NAME))) return openSafetensorsIndex(dir, options);
  const single = path.join(dir, 'model.safetensors');
  if (fs.existsSync(single)) return openSafetensors(single, options);
  throw new FormatError(`model directory ${dir}: neither ${SAFETENSORS_INDEX_NAME} nor model.safetensors found`);
}

// ---------------------------------------------------------------------------------------------------
// writer

/** One tensor to write. `data` is any typed array holding exactly prod(shape) * DTYPE_SIZE[dtype] bytes. */
export interface TensorToWrite {
  dtype: SafetensorsDType;
  /** Row-major shape; `[]` for a scalar. */
  shape: readonly number[];
  /** Little-endian element data (e.g. Float32Array for F32, Uint16Array bits for BF16, or raw Uint8Array bytes). */
  data: ArrayBufferView;
}

interface Prepared {
  chunks: Uint8Array[];
  totalTensorBytes: number;
}

/**
 * Builds the header and the chunk list of a file (no copy of tensor data). Exported for tests and
 * for callers that stream the bytes themselves.
 */
export function serializeSafetensors(tensors: Record<string, TensorToWrite>, metadata?: Record<string, string>): Prepared {
  const names = Object.keys(tensors);
  if (names.includes('__metadata__')) throw new FormatError('writeSafetensors: "__metadata__" is reserved and cannot be a tensor name');
  for (const name of names) {
    const t = tensors[name];
    if (!isSafetensorsDType(t.dtype)) throw new DTypeError(`writeSafetensors: tensor "${name}": unknown dtype ${JSON.stringify(t.dtype)} (known: ${SAFETENSORS_DTYPES.join(', ')})`);
    if (!Array.isArray(t.shape) || !t.shape.every(isNonNegInt)) throw new ShapeError(`writeSafetensors: tensor "${name}": shape must be an array of non-negative integers, got ${JSON.stringify(t.shape)}`);
    if (!ArrayBuffer.isView(t.data)) throw new DTypeError(`writeSafetensors: tensor "${name}": data must be a typed array`);
    const size = DTYPE_SIZE[t.dtype];
    const bpe = (t.data as unknown as { BYTES_PER_ELEMENT?: number }).BYTES_PER_ELEMENT;
    if (bpe !== undefined && bpe !== 1 && bpe !== size) {
      throw new DTypeError(`writeSafetensors: tensor "${name}": ${t.data.constructor.name} (${bpe} bytes per element) cannot hold ${t.dtype} (${size} bytes per element)`);
    }
    let want = BigInt(size);
    for (const d of t.shape) want *= BigInt(d);
    if (want !== BigInt(t.data.byteLength)) {
      throw new ShapeError(`writeSafetensors: tensor "${name}": shape [${t.shape.join(', ')}] of ${t.dtype} needs ${want} bytes, data has ${t.data.byteLength}`);
    }
  }
  names.sort((a, b) => DTYPE_RANK[tensors[b].dtype] - DTYPE_RANK[tensors[a].dtype] || (a < b ? -1 : a > b ? 1 : 0));
  const parts: string[] = [];
  if (metadata && Object.keys(metadata).length > 0) {
    const keys = Object.keys(metadata).sort();
    for (const k of keys) {
      if (typeof metadata[k] !== 'string') throw new FormatError(`writeSafetensors: metadata["${k}"] must be a string, got ${typeof metadata[k]}`);
    }
    parts.push(`"__metadata__":{${keys.map((k) => `${JSON.stringify(k)}:${JSON.stringify(metadata[k])}`).join(',')}}`);
  }
  let off = 0;
  const chunks: Uint8Array[] = [];
  for (const name of names) {
    const t = tensors[name];
    const len = t.data.byteLength;
    parts.push(`${JSON.stringify(name)}:{"dtype":"${t.dtype}","shape":[${t.shape.join(',')}],"data_offsets":[${off},${off + len}]}`);
    off += len;
    if (len > 0) chunks.push(new Uint8Array(t.data.buffer, t.data.byteOffset, len));
  }
  let header = Buffer.from(`{${parts.join(',')}}`, 'utf8');
  const pad = (8 - (header.length % 8)) % 8;
  if (pad) header = Buffer.concat([header, Buffer.alloc(pad, 0x20)]);
  const head = Buffer.alloc(8 + header.length);
  head.writeBigUInt64LE(BigInt(header.length), 0);
  header.copy(head, 8);
  return { chunks: [head, ...chunks], totalTensorBytes: off };
}

/**
 * Writes a safetensors file atomically (temp file, fsync, rename). Tensors are ordered by descending
 * dtype then name, as the Rust crate does, so the output is byte-identical to `safetensors.torch.save_file`.
 * @param file destination path.
 * @param tensors name -> { dtype, shape, data }; data length is checked against the shape (ShapeError).
 * @param metadata optional `__metadata__` string map (written with sorted keys).
 */
export function writeSafetensors(file: string, tensors: Record<string, TensorToWrite>, metadata?: Record<string, string>): void {
  writeFileAtomic(file, serializeSafetensors(tensors, metadata).chunks);
}

/** Async form of {@link writeSafetensors}. */
export async function writeSafetensorsAsync(file: string, tensors: Record<string, TensorToWrite>, metadata?: Record<string, string>): Promise<void> {
  await writeFileAtomicAsync(file, serializeSafetensors(tensors, metadata).chunks);
}

/** Options of {@link writeSafetensorsSharded}. */
export interface WriteShardedOptions {
  /** Largest tensor-data size of one shard, in bytes. A single larger tensor gets a shard of its own. Default 5 GB (5e9, like HF `max_shard_size="5GB"`). */
  maxShardBytes?: number;
  /** `__metadata__` of every shard. Default `{ format: 'pt' }` (what transformers expects). */
  metadata?: Record<string, string>;
  /** File-name prefix: shards are `<prefix>-0000k-of-0000n.safetensors`, the index `<prefix>.safetensors.index.json`. Default 'model'. */
  prefix?: string;
}

/** What {@link writeSafetensorsSharded} wrote. */
export interface ShardedWriteResult {
  /** Shard paths in order. */
  files: string[];
  /** Path of the index file. */
  indexPath: string;
  /** Sum of the tensor data sizes in bytes (the index's `metadata.total_size`). */
  totalSize: number;
}

/**
 * Writes a sharded checkpoint: tensors packed greedily in the given key order into shards of at most
 * `maxShardBytes` of data, each written atomically, then `<prefix>.safetensors.index.json` with
 * `{ metadata: { total_size }, weight_map }` (keys sorted) written last.
 */
export function writeSafetensorsSharded(dir: string, tensors: Record<string, TensorToWrite>, options: WriteShardedOptions = {}): ShardedWriteResult {
  const max = options.maxShardBytes ?? 5e9;
  if (!(max > 0)) throw new ShapeError(`writeSafetensorsSharded: maxShardBytes must be > 0, got ${max}`);
  const prefix = options.prefix ?? 'model';
  const metadata = options.metadata ?? { format: 'pt' };
  const groups: string[][] = [];
  let cur: string[] = [];
  let curBytes = 0;
  let total = 0;
  for (const [name, t] of Object.entries(tensors)) {
    const b = ArrayBuffer.isView(t.data) ? t.data.byteLength : 0;
    if (cur.length > 0 && curBytes + b > max) {
      groups.push(cur);
      cur = [];
      curBytes = 0;
    }
    cur.push(name);
    curBytes += b;
    total += b;
  }
  if (cur.length > 0 || groups.length === 0) groups.push(cur);
  const n = groups.length;
  const pad5 = (k: number): string => String(k).padStart(5, '0');
  const files: string[] = [];
  const weightMap: Record<string, string> = {};
  groups.forEach((g, i) => {
    const fname = `${prefix}-${pad5(i + 1)}-of-${pad5(n)}.safetensors`;
    const part: Record<string, TensorToWrite> = {};
    for (const name of g) {
      part[name] = tensors[name];
      weightMap[name] = fname;
    }
    const p = path.join(dir, fname);
    writeSafetensors(p, part, metadata);
    files.push(p);
  });
  const sortedMap: Record<string, string> = {};
  for (const k of Object.keys(weightMap).sort()) sortedMap[k] = weightMap[k];
  const indexPath = path.join(dir, `${prefix}.safetensors.index.json`);
  writeFileAtomic(indexPath, JSON.stringify({ metadata: { total_size: total }, weight_map: sortedMap }, null, 2) + '\n');
  return { files, indexPath, totalSize: total };
}
