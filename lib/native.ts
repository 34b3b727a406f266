/**
 * Loads the native addon. Order: `BTS_NATIVE_PATH` (an explicit .node file, used by tests of other
 * builds), then node-gyp-build: a local build in build/Release, then the bundled prebuild in
 * prebuilds/<platform>-<arch>/. The typed surface of the addon is declared here and only here.
 */
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { NoBinaryFoundError } from './errors.js';
import type { NativeLlama, NativeLlamaConfig, NativeMappedFile, NativeWeight } from './engine/native.js';
import type { NativeStitched, NativeStitchSpec } from './engine/stitched-native.js';

export type NativeDType = 'f32' | 'bf16' | 'i32' | 'f64' | 'i64';
export type NativeTensor = Float32Array | Uint16Array | Int32Array | Float64Array | BigInt64Array | null;

export interface NativeOpSpec {
  name: string;
  tensors: { name: string; dtype: NativeDType; optional: boolean; output: boolean }[];
  scalars: string[];
}

export interface NativeInfo {
  simd: string;
  bestSimd: string;
  simdLevels: string[];
  cpu: Record<string, string | boolean>;
  threads: number;
  build: { compiler: string; napiVersion: number; compiledLevels: string; cuda: boolean; date: string };
}

export interface NativeAddon {
  callOp(name: string, tensors: NativeTensor[], scalars: (number | boolean)[]): void;
  callOpAsync(name: string, tensors: NativeTensor[], scalars: (number | boolean)[]): Promise<void>;
  listOps(): NativeOpSpec[];
  info(): NativeInfo;
  setSimd(level: string): void;
  setThreads(n: number): void;
  /** Native Llama engine (raw; lib/engine/native.ts `llamaCreate` adds argument checks and typed errors). */
  llamaCreate(config: NativeLlamaConfig, weights: Record<string, NativeWeight>, grads: Record<string, Float32Array> | null): NativeLlama;
  /** Read-only memory map of a file (raw; see lib/engine/native.ts `mapFile`). */
  mapFile(path: string): NativeMappedFile;
  /** Native stitched model (raw; lib/engine/stitched-native.ts `stitchedCreate` adds argument checks and typed errors). */
  stitchedCreate(
    config: NativeLlamaConfig,
    hub: Record<string, NativeWeight>,
    experts: Record<string, NativeWeight>[],
    spec: NativeStitchSpec,
    weights: Record<string, Float32Array>,
    grads: Record<string, Float32Array> | null,
  ): NativeStitched;
}

/** The package root (the folder holding package.json), from lib/ or dist/. */
export const packageRoot = join(dirname(fileURLToPath(import.meta.url)), '..');

let addon: NativeAddon | undefined;
let loadedFrom = '';

/** The loaded addon (loaded on first use). Throws NoBinaryFoundError with the reason. */
export function native(): NativeAddon {
  if (addon) return addon;
  const require = createRequire(import.meta.url);
  const explicit = process.env.BTS_NATIVE_PATH;
  try {
    if (explicit) {
      addon = require(explicit) as NativeAddon;
      loadedFrom = explicit;
    } else {
      const load = require('node-gyp-build') as ((dir: string) => NativeAddon) & { resolve?: (dir: string) => string };
      addon = load(packageRoot);
      loadedFrom = load.resolve ? load.resolve(packageRoot) : packageRoot;
    }
  } catch (e) {
    throw new NoBinaryFoundError(
      `branch-train-stitch: could not load the native addon (${(e as Error).message}). ` +
        'Reinstall the package, or build it from source with `npm rebuild branch-train-stitch --build-from-source`.',
      { cause: e },
    );
  }
  return addon;
}

/** Path of the loaded .node file. */
export function nativePath(): string {
  native();
  return loadedFrom;
}
