/**
 * engine/device-moments.ts: the bookkeeping of a device-side AdamW, shared by LlamaModel and
 * StitchedModel on CUDA. The moments live on the device after the first step with a pair of host
 * arrays (uploaded once); the host arrays are stale until {@link DeviceMoments.sync} copies the device
 * state back. This class remembers which host pair the device state came from and whether it is newer
 * than them, and refuses what would lose it (switching arrays, dropping the engine) while it is.
 */
import { ArgumentError } from '../errors.js';
import type { CudaAdamwOptions } from './cuda-native.js';

/** The device engine calls a device step uses (CudaLlama, CudaStitched). */
export interface DeviceOptimizer {
  adamwStep(o: CudaAdamwOptions): Promise<number>;
  uploadMoments(m: Record<string, Float32Array>, v: Record<string, Float32Array>): Promise<void>;
  downloadMoments(m: Record<string, Float32Array>, v: Record<string, Float32Array>): Promise<void>;
  downloadWeights(out: Record<string, Float32Array>): Promise<void>;
}

/** Views of one flat array (params, m or v) by tensor name, in the engine's names. */
export type FlatViews = (flat: Float32Array) => Record<string, Float32Array>;

export class DeviceMoments {
  private host: { m: Float32Array; v: Float32Array } | null = null;
  private ahead = false;

  /** True while the device holds moments newer than their host arrays. */
  get isAhead(): boolean {
    return this.ahead;
  }

  /**
   * One device AdamW step over `o.m` / `o.v` (uploaded when they are not the pair the device state
   * came from), `beforeStep` run just before it; the updated weights are copied into `params`.
   * @returns the global gradient norm before clipping.
   */
  async step(dev: DeviceOptimizer, views: FlatViews, params: Float32Array, o: CudaAdamwOptions & { m: Float32Array; v: Float32Array }, beforeStep?: () => Promise<void>): Promise<number> {
    if (!this.host || this.host.m !== o.m || this.host.v !== o.v) {
      if (this.ahead) throw new ArgumentError('optimizerStep: the device holds moments newer than their host arrays; call syncMoments() with those arrays before switching to others');
      await dev.uploadMoments(views(o.m), views(o.v));
      this.host = { m: o.m, v: o.v };
    }
    if (beforeStep) await beforeStep();
    this.ahead = true;
    const gradNorm = await dev.adamwStep({ lr: o.lr, beta1: o.beta1, beta2: o.beta2, eps: o.eps, weightDecay: o.weightDecay, maxGradNorm: o.maxGradNorm, step: o.step });
    await dev.downloadWeights(views(params));
    return gradNorm;
  }

  /** Copies the device moments into `m` / `v` when they are newer (`dev` null: no engine, nothing to do). */
  async sync(dev: DeviceOptimizer | null, views: FlatViews, m: Float32Array, v: Float32Array): Promise<void> {
    if (!this.ahead || !this.host || !dev) return;
    if (this.host.m !== m || this.host.v !== v) throw new ArgumentError('syncMoments: these are not the moment arrays the device optimizer was started with');
    await dev.downloadMoments(views(m), views(v));
    this.ahead = false;
  }

  /** Refuses to drop a CUDA engine whose optimizer state has not been copied back (it would be lost). */
  checkSynced(what: string): void {
    if (this.ahead) throw new ArgumentError(`${what}: the CUDA engine holds AdamW moments newer than the host arrays; await syncMoments(m, v) first (a Trainer does at every checkpoint)`);
  }

  /** Forgets the device state (its engine was dropped). */
  reset(): void {
    this.host = null;
    this.ahead = false;
  }
}
