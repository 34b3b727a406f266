/**
 * GEMM: `c = alpha * op(a) op(b) + beta * c`, row-major, as BLAS sgemm. op(a) is [m, k] and op(b) is
 * [k, n]; `transA` means `a` is stored [k, m], `transB` means `b` is stored [n, k] (a Linear weight:
 * `y = x W^T` is `gemm({ a: x, b: W, transB: true })`). Leading dimensions (`lda`, `ldb`, `ldc`,
 * elements between rows) allow strided views; a strided buffer needs at least
 * `(rows - 1) * ld + cols` elements. `beta = 0` (the default) never reads `c`, so NaNs there vanish.
 *
 * `gemmBf16` takes `b` as bf16 bit patterns (Uint16Array, e.g. frozen weights from
 * {@link toBf16}); fp32 accumulation and output. On CPUs with AVX512_BF16, `a` is rounded to bf16 for
 * the dot products (relative error ~1e-2 of the output scale); elsewhere `a` stays fp32.
 */
import { ArgumentError, ShapeError } from '../errors.js';
import { bf16, defineOp, f32, num } from './core.js';
import { bf16ToF32, f32ToBf16 } from '../formats/safetensors.js';

export interface GemmArgs<B> {
  /** op(a) is [m, k]: `a` is [m, k] (row stride `lda`), or [k, m] when `transA`. */
  a: Float32Array;
  /** op(b) is [k, n]: `b` is [k, n] (row stride `ldb`), or [n, k] when `transB`. */
  b: B;
  /** [m, n] output (row stride `ldc`), read when beta != 0; allocated (zeroed) if omitted. */
  c?: Float32Array;
  /** Rows of op(a) and c. */
  m: number;
  /** Columns of op(b) and c. */
  n: number;
  /** Columns of op(a), rows of op(b). 0 gives c = beta * c. */
  k: number;
  /** `a` is stored [k, m]. Default false. Not supported by gemmBf16. */
  transA?: boolean;
  /** `b` is stored [n, k]. Default false for gemm, true for gemmBf16 (the Linear layout). */
  transB?: boolean;
  /** Elements between rows of `a` as stored. Default: its row length (k, or m when transA). */
  lda?: number;
  /** Elements between rows of `b` as stored. Default: its row length (n, or k when transB). */
  ldb?: number;
  /** Elements between rows of `c`. Default n. */
  ldc?: number;
  /** Scale of the product. Default 1. */
  alpha?: number;
  /** Scale of the old c. Default 0 (c is write-only). */
  beta?: number;
}

function dim(op: string, name: string, v: unknown, min: number): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > 2 ** 40)
    throw new ArgumentError(`${op}: '${name}' must be an integer >= ${min}, got ${String(v)}`);
  return v;
}

function flag(op: string, name: string, v: unknown, dflt: boolean): boolean {
  if (v === undefined) return dflt;
  if (typeof v !== 'boolean') throw new ArgumentError(`${op}: '${name}' must be a boolean, got ${String(v)}`);
  return v;
}

/** Leading dimension option: default `cols`, at least max(1, cols). */
function ld(op: string, name: string, v: unknown, cols: number, what: string): number {
  if (v === undefined) return Math.max(1, cols);
  const x = dim(op, name, v, 1);
  if (x < cols) throw new ArgumentError(`${op}: '${name}' must be >= ${what} = ${cols}, got ${x}`);
  return x;
}

/** Elements a [rows, cols] view with row stride `ldv` needs. */
function need(rows: number, cols: number, ldv: number): number {
  return rows === 0 || cols === 0 ? 0 : (rows - 1) * ldv + cols;
}

function atLeast(op: string, name: string, arr: { length: number }, n: number, shape: string): void {
  if (arr.length < n) throw new ShapeError(`${op}: argument '${name}' has ${arr.length} elements, expected at least ${shape} = ${n}`);
}

function prepare<B extends Float32Array | Uint16Array>(op: string, nativeOp: string, args: GemmArgs<B>, isBf16: boolean) {
  const m = dim(op, 'm', args.m, 0);
  const n = dim(op, 'n', args.n, 0);
  const k = dim(op, 'k', args.k, 0);
  const transA = flag(op, 'transA', args.transA, false);
  const transB = flag(op, 'transB', args.transB, isBf16);
  if (isBf16 && transA) throw new ArgumentError(`${op}: transA is not supported (a must be [m, k])`);
  const a = f32(op, 'a', args.a);
  const b = (isBf16 ? bf16(op, 'b', args.b) : f32(op, 'b', args.b)) as B;
  const [aRows, aCols] = transA ? [k, m] : [m, k];
  const [bRows, bCols] = transB ? [n, k] : [k, n];
  const lda = ld(op, 'lda', args.lda, aCols, transA ? 'm' : 'k');
  const ldb = ld(op, 'ldb', args.ldb, bCols, transB ? 'k' : 'n');
  const ldc = ld(op, 'ldc', args.ldc, n, 'n');
  const alpha = num(op, 'alpha', args.alpha, 1);
  const beta = num(op, 'beta', args.beta, 0);
  atLeast(op, 'a', a, need(aRows, aCols, lda), transA ? '(k-1)*lda+m' : '(m-1)*lda+k');
  atLeast(op, 'b', b, need(bRows, bCols, ldb), transB ? '(n-1)*ldb+k' : '(k-1)*ldb+n');
  const cNeed = need(m, n, ldc);
  const c = args.c === undefined || args.c === null ? new Float32Array(cNeed) : f32(op, 'c', args.c);
  atLeast(op, 'c', c, cNeed, '(m-1)*ldc+n');
  return {
    op: nativeOp,
    tensors: [a, b, c],
    scalars: [m, n, k, transA, transB, lda, ldb, ldc, alpha, beta],
    result: c,
  };
}

const gemmOp = defineOp((args: GemmArgs<Float32Array>) => prepare('gemm', 'gemm_f32', args, false));
/** fp32 GEMM `c = alpha * op(a) op(b) + beta * c`. Returns `c`. Threaded; deterministic per thread count. */
export const gemm = gemmOp.sync;
/** fp32 GEMM on the compute pool, off the event loop. */
export const gemmAsync = gemmOp.async;

const gemmBf16Op = defineOp((args: GemmArgs<Uint16Array>) => prepare('gemmBf16', 'gemm_bf16', args, true));
/**
 * GEMM with bf16 `b` (Uint16Array of bf16 bits), fp32 `a` and `c`: NT (`transB`, the default) or NN.
 * Returns `c`.
 */
export const gemmBf16 = gemmBf16Op.sync;
/** bf16-weight GEMM, async. */
export const gemmBf16Async = gemmBf16Op.async;


/**
 * fp32 -> bf16 bit patterns, round-to-nearest-even, NaN kept (quiet), as torch's `.to(bfloat16)` and
 * the native `f32_to_bf16`.
 */
export function toBf16(x: Float32Array): Uint16Array {
  return f32ToBf16(f32('toBf16', 'x', x));
}

/** bf16 bit patterns -> fp32 (exact). */
export function fromBf16(x: Uint16Array): Float32Array {
  return bf16ToF32(bf16('fromBf16', 'x', x));
}
