/**
 * The machinery under every public op: argument checks that name the argument, output allocation,
 * and the sync / async native call. Each op module describes its call with a `prepare` function and
 * gets both forms from {@link defineOp}.
 */
import { native, type NativeTensor } from '../native.js';
import { ArgumentError, DTypeError, ShapeError, fromNative } from '../errors.js';

/** What a prepare function returns: the native op name, its tensors and scalars, and the result. */
export interface PreparedCall<R> {
  op: string;
  tensors: NativeTensor[];
  scalars: (number | boolean)[];
  result: R;
}

export interface OpForms<A, R> {
  sync: (args: A) => R;
  async: (args: A) => Promise<R>;
}

/** Builds the sync and async forms of an op from its prepare function. */
export function defineOp<A, R>(prepare: (args: A) => PreparedCall<R>): OpForms<A, R> {
  return {
    sync(args: A): R {
      const c = prepare(args);
      try {
        native().callOp(c.op, c.tensors, c.scalars);
      } catch (e) {
        throw fromNative(e);
      }
      return c.result;
    },
    async async(args: A): Promise<R> {
      const c = prepare(args);
      try {
        await native().callOpAsync(c.op, c.tensors, c.scalars);
      } catch (e) {
        throw fromNative(e);
      }
      return c.result;
    },
  };
}

type TypedCtor = Float32ArrayConstructor | Uint16ArrayConstructor | Int32ArrayConstructor | Float64ArrayConstructor;

function checkType(op: string, name: string, a: unknown, Ctor: TypedCtor | BigInt64ArrayConstructor, what: string): void {
  if (!(a instanceof Ctor)) {
    const got = a === null ? 'null' : a === undefined ? 'undefined' : ((a as object).constructor?.name ?? typeof a);
    throw new DTypeError(`${op}: argument '${name}' must be a ${what}, got ${got}`);
  }
}

/** Checks `a` is a Float32Array (optionally of exactly `len` elements) and returns it. */
export function f32(op: string, name: string, a: unknown, len?: number, shape?: string): Float32Array {
  checkType(op, name, a, Float32Array, 'Float32Array');
  const arr = a as Float32Array;
  if (len !== undefined && arr.length !== len)
    throw new ShapeError(`${op}: argument '${name}' has ${arr.length} elements, expected ${shape ?? ''}${shape ? ' = ' : ''}${len}`);
  return arr;
}

/** Checks `a` is a Uint16Array holding bf16 values. */
export function bf16(op: string, name: string, a: unknown, len?: number, shape?: string): Uint16Array {
  checkType(op, name, a, Uint16Array, 'Uint16Array (bf16)');
  const arr = a as Uint16Array;
  if (len !== undefined && arr.length !== len)
    throw new ShapeError(`${op}: argument '${name}' has ${arr.length} elements, expected ${shape ?? ''}${shape ? ' = ' : ''}${len}`);
  return arr;
}

/** Checks `a` is an Int32Array. */
export function i32(op: string, name: string, a: unknown, len?: number, shape?: string): Int32Array {
  checkType(op, name, a, Int32Array, 'Int32Array');
  const arr = a as Int32Array;
  if (len !== undefined && arr.length !== len)
    throw new ShapeError(`${op}: argument '${name}' has ${arr.length} elements, expected ${shape ?? ''}${shape ? ' = ' : ''}${len}`);
  return arr;
}

/** An optional Float32Array output: checked if given, allocated (zeroed) if not. */
export function outF32(op: string, name: string, a: unknown, len: number, shape?: string): Float32Array {
  if (a === undefined || a === null) return new Float32Array(len);
  return f32(op, name, a, len, shape);
}

/** `total / per` as an integer, or a ShapeError naming `name`. */
export function rows(op: string, name: string, total: number, per: number, perName: string): number {
  if (per <= 0 || total % per !== 0)
    throw new ShapeError(`${op}: argument '${name}' has ${total} elements, not a multiple of ${perName} = ${per}`);
  return total / per;
}

/** A positive integer option (or its default). */
export function posInt(op: string, name: string, v: unknown, dflt?: number): number {
  const x = v === undefined ? dflt : v;
  if (typeof x !== 'number' || !Number.isInteger(x) || x <= 0)
    throw new ArgumentError(`${op}: '${name}' must be a positive integer, got ${String(v)}`);
  return x;
}

/** A finite number option (or its default). */
export function num(op: string, name: string, v: unknown, dflt?: number): number {
  const x = v === undefined ? dflt : v;
  if (typeof x !== 'number' || !Number.isFinite(x)) throw new ArgumentError(`${op}: '${name}' must be a finite number, got ${String(v)}`);
  return x;
}
