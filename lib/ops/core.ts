/**
 * The machinery under every public op: argument checks that name the argument, output allocation,
 * the device choice, and the sync / async native call. Each op module describes its call with a
 * `prepare` function and gets both forms from {@link defineOp}.
 *
 * Device routing: every op takes `device?: Device` ({@link DeviceOption}). 'cpu' (the default, unless
 * `setDevice` or BTS_DEVICE say otherwise) calls the CPU addon exactly as before, with no probe and
 * one extra property read; 'cuda' / 'auto' go through lib/device.ts and, when CUDA is available, call
 * the CUDA addon's op of the same name with the same tensors and scalars (outputs are copied back into
 * the same typed arrays, so results read the same way).
 */
import { native, type NativeTensor } from '../native.js';
import { ArgumentError, DTypeError, ShapeError, fromNative } from '../errors.js';
import { cudaAddon, getDevice, resolveDevice, type Device } from '../device.js';

/** What a prepare function returns: the native op name, its tensors and scalars, and the result. */
export interface PreparedCall<R> {
  op: string;
  tensors: NativeTensor[];
  scalars: (number | boolean)[];
  result: R;
}

/** The option every op accepts besides its own arguments. */
export interface DeviceOption {
  /**
   * Where the op runs: 'cpu', 'cuda' (throws DeviceUnavailableError when CUDA is unavailable) or
   * 'auto' (CUDA when available, else the CPU with one line on stderr). Default: the process default
   * (`setDevice()`, else the environment variable BTS_DEVICE, else 'cpu'). See lib/device.ts.
   */
  device?: Device;
}

export interface OpForms<A, R> {
  sync: (args: A & DeviceOption) => R;
  async: (args: A & DeviceOption) => Promise<R>;
}

/** The addon that runs an op on `device` (the CPU addon unless it resolves to CUDA). */
function backend(device: Device | undefined) {
  const d = device ?? getDevice();
  if (d === 'cpu') return native();
  return resolveDevice(d) === 'cuda' ? cudaAddon() : native();
}

/** Builds the sync and async forms of an op from its prepare function. */
export function defineOp<A, R>(prepare: (args: A) => PreparedCall<R>): OpForms<A, R> {
  return {
    sync(args: A & DeviceOption): R {
      const addon = backend(args?.device);
      const c = prepare(args);
      try {
        addon.callOp(c.op, c.tensors, c.scalars);
      } catch (e) {
        throw fromNative(e);
      }
      return c.result;
    },
    async async(args: A & DeviceOption): Promise<R> {
      const addon = backend(args?.device);
      const c = prepare(args);
      try {
        await addon.callOpAsync(c.op, c.tensors, c.scalars);
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
