/**
 * Run-time settings and facts of the native backend: SIMD level, threads, build.
 */
import { native, nativePath, type NativeInfo } from './native.js';
import { ArgumentError, fromNative } from './errors.js';

export type SimdLevel = 'reference' | 'scalar' | 'avx2' | 'avx512';

export interface BackendInfo extends NativeInfo {
  /** Path of the loaded native binary. */
  binary: string;
}

/** SIMD level in use, the levels this CPU supports, thread count and build facts. */
export function info(): BackendInfo {
  return { ...native().info(), binary: nativePath() };
}

/**
 * Forces a SIMD level for all following ops ('reference' runs the plain-loop oracle). The default is
 * the best level of the CPU, or `BTS_SIMD` from the environment. Throws UnsupportedSimdError if the
 * CPU lacks it.
 */
export function setSimdLevel(level: SimdLevel): void {
  try {
    native().setSimd(level);
  } catch (e) {
    throw fromNative(e);
  }
}

/** Levels this CPU can run, lowest first (always includes 'reference' and 'scalar'). */
export function simdLevels(): SimdLevel[] {
  return native().info().simdLevels as SimdLevel[];
}

/**
 * Sets the number of compute threads (default: all cores, or `BTS_THREADS`). The thread that calls an
 * op is one of them; ops never run side by side, so async calls from many places never oversubscribe.
 */
export function setThreads(n: number): void {
  if (!Number.isInteger(n) || n < 1 || n > 256) throw new ArgumentError(`setThreads: n must be an integer in 1..256, got ${n}`);
  native().setThreads(n);
}
