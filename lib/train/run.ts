/**
 * High-level training runs shared by the CLI (`bts pretrain`, `bts train`, `bts stitch`) and the BTS
 * pipeline: token corpora in, a trained model directory out, with checkpoints that make a rerun of the
 * same command resume where it stopped, a live progress line, a loss-curve image and a JSON summary.
 *
 * Output folder layout:
 *   <out>/config.json, model.safetensors, tokenizer.json   the trained model (Llama runs), or
 *   <out>/stitch.json, stitches.safetensors                the trained stitches (stitched runs)
 *   <out>/checkpoints/                                     trainer checkpoints (resume)
 *   <out>/loss.svg                                         training / held-out loss curve
 *   <out>/train.json                                       options, final losses, speed, history
 * The final model is written only when training completes; a folder with checkpoints/ but no
 * train.json is an unfinished run, and running the same command again resumes it.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ArgumentError } from '../errors.js';
import { writeFileAtomic } from '../formats/atomic.js';
import { evalBatches, MixtureLoader, PackedLoader, type LoaderState, type MixtureState } from '../data/loader.js';
import type { TokenCorpus } from '../data/tokens.js';
import { Progress } from '../util/progress.js';
import { Trainer, type Batch, type BatchSource, type TrainProgress, type TrainResult, type TrainableModel } from './trainer.js';

/** Options of {@link runTraining} (Trainer options without the data plumbing). */
export interface RunTrainingOptions {
  /** Training data: one corpus, or named corpora mixed by `mixWeights`. */
  train: TokenCorpus | Record<string, TokenCorpus>;
  /** Domain weights of a mixture (e.g. { code: 0.15, math: 0.15, multilingual: 0.15, general: 0.55 }). */
  mixWeights?: Record<string, number>;
  /** Held-out corpus for evaluation, or null. */
  heldOut?: TokenCorpus | null;
  out: string;
  batchSize: number;
  seqLen: number;
  steps: number;
  gradAccumSteps?: number;
  lr?: number;
  warmupSteps?: number;
  minLrRatio?: number;
  weightDecay?: number;
  maxGradNorm?: number;
  precision?: 'f32' | 'bf16';
  evalEvery?: number;
  evalBatches?: number;
  checkpointEvery?: number;
  seed?: number;
  /** Title of the loss curve. */
  title?: string;
  /** Start over even when checkpoints exist. Default false (resume). */
  fresh?: boolean;
  /** Show the progress line on stderr. Default true. */
  progress?: boolean;
  /** Progress label. */
  label?: string;
  onProgress?: (p: TrainProgress) => void;
  signal?: AbortSignal;
  /** Writes the final model into `out` (the model's own format). */
  saveFinal: (model: TrainableModel, out: string) => Promise<void>;
  /** Rebuilds the model from a checkpoint's model folder (resume). */
  loadCheckpointModel: (dir: string) => Promise<TrainableModel>;
}

/** A run's summary, as written to `<out>/train.json`. */
export interface RunSummary extends Omit<TrainResult, 'history'> {
  resumedFromStep: number;
  options: Record<string, unknown>;
  history: TrainResult['history'];
}

/**
 * Trains `model` (or, when `<out>/checkpoints` holds a checkpoint and `fresh` is not set, the model
 * rebuilt from it) and writes the outputs listed in the file comment. Returns the trained model
 * (the resumed one when resuming: the caller's `model` is then left untouched) and the summary.
 */
export async function runTraining(model: TrainableModel, o: RunTrainingOptions): Promise<{ model: TrainableModel; summary: RunSummary }> {
  if (!o.out) throw new ArgumentError('runTraining: out is required');
  fs.mkdirSync(o.out, { recursive: true });
  const ckpt = path.join(o.out, 'checkpoints');
  if (o.fresh) fs.rmSync(ckpt, { recursive: true, force: true });
  const T = o.seqLen;
  const seed = o.seed ?? 0;
  const isMix = !(o.train as TokenCorpus).tokens;
  const data = (state: unknown): BatchSource => {
    if (isMix) {
      const corpora = o.train as Record<string, TokenCorpus>;
      const weights = o.mixWeights ?? Object.fromEntries(Object.keys(corpora).map((k) => [k, 1]));
      if (state) return MixtureLoader.restore(corpora, state as MixtureState);
      const loaders: Record<string, PackedLoader> = {};
      Object.keys(corpora).forEach((k, i) => (loaders[k] = new PackedLoader(corpora[k], { T, seed: seed * 1000 + i })));
      return new MixtureLoader(loaders, weights, { seed });
    }
    const corpus = o.train as TokenCorpus;
    return state ? PackedLoader.restore(corpus, state as LoaderState) : new PackedLoader(corpus, { T, seed });
  };
  const heldOut = o.heldOut && o.heldOut.tokens.length > 1 ? o.heldOut : null;
  const evalData = heldOut ? (): Iterable<Batch> => evalBatches(heldOut, { T, B: o.batchSize }) : null;
  const progress = o.progress !== false ? new Progress({ total: o.steps, label: o.label ?? 'training', unit: 'steps' }) : null;
  const topts = {
    data,
    evalData,
    batchSize: o.batchSize,
    seqLen: T,
    gradAccumSteps: o.gradAccumSteps,
    steps: o.steps,
    lr: o.lr,
    warmupSteps: o.warmupSteps,
    minLrRatio: o.minLrRatio,
    weightDecay: o.weightDecay,
    maxGradNorm: o.maxGradNorm,
    precision: o.precision,
    checkpointDir: ckpt,
    checkpointEvery: o.checkpointEvery ?? Math.max(1, Math.floor(o.steps / 10)),
    evalEvery: o.evalEvery,
    evalBatches: o.evalBatches,
    lossCurve: path.join(o.out, 'loss.svg'),
    title: o.title,
    signal: o.signal,
    onProgress: (p: TrainProgress) => {
      progress?.update(p.step, { loss: p.loss.toFixed(3), ...(p.evalLoss !== undefined ? { 'held-out': p.evalLoss.toFixed(3) } : {}), 'tok/s': Math.round(p.tokensPerSecond) });
      o.onProgress?.(p);
    },
  };
  const resuming = !o.fresh && Trainer.hasCheckpoint(ckpt);
  const trainer = resuming ? await Trainer.resume(ckpt, topts, o.loadCheckpointModel) : Trainer.create(model, topts);
  const resumedFromStep = trainer.step;
  if (resuming) process.stderr.write(`${o.label ?? 'training'}: resuming from step ${resumedFromStep} (${ckpt})\n`);
  let result: TrainResult;
  try {
    result = await trainer.run();
  } finally {
    progress?.finish();
  }
  await o.saveFinal(trainer.model, o.out);
  const { history, ...rest } = result;
  const summary: RunSummary = {
    ...rest,
    resumedFromStep,
    options: { batchSize: o.batchSize, seqLen: T, steps: o.steps, gradAccumSteps: o.gradAccumSteps ?? 1, lr: o.lr, warmupSteps: o.warmupSteps, minLrRatio: o.minLrRatio, weightDecay: o.weightDecay, maxGradNorm: o.maxGradNorm, precision: o.precision ?? 'f32', seed, mixWeights: o.mixWeights ?? null },
    history,
  };
  writeFileAtomic(path.join(o.out, 'train.json'), JSON.stringify(summary, null, 1) + '\n');
  return { model: trainer.model, summary };
}
