/**
 * Trainer: continual pretraining of a LlamaModel (all weights trainable), with AdamW, linear warmup
 * and cosine decay, global gradient-norm clipping, gradient accumulation, periodic held-out
 * evaluation, atomic checkpoints that resume the same loss trajectory, progress reporting, an
 * AbortSignal and a loss-curve image.
 *
 * One optimizer step:
 *   1. draw `gradAccumSteps` micro-batches [B, T] from the data source (its position is part of every
 *      checkpoint), count their non-ignored targets C;
 *   2. zero the gradients, then forwardBackward each micro-batch with gradScale = 1 / C, so the
 *      accumulated gradient is that of the mean loss over all C targets (as one big batch would give);
 *   3. one fused native AdamW step over the flat parameter buffer (clipping included): the model's
 *      own optimizerStep where it has one (LlamaModel, StitchedModel: on the CPU the same native op;
 *      on CUDA the device optimizer, moments on the GPU, copied back by syncMoments before every
 *      checkpoint);
 *   4. in bf16 mixed precision, refresh the bf16 copies of the block matrices from the fp32 masters.
 * Every native call is async (the event loop stays free); the signal is checked between micro-batches.
 *
 * Checkpoint directory layout (all written atomically: a step folder is built under a temporary name
 * and renamed into place, then `checkpoint.json` is replaced atomically to point at it):
 *   <dir>/checkpoint.json          { "format": "bts-checkpoint", "version": 1, "latest": "step-000120" }
 *   <dir>/step-000120/model/       config.json, model.safetensors (fp32), tokenizer.json
 *   <dir>/step-000120/optimizer.safetensors   AdamW moments m, v (flat, layout of lib/model/layout.ts)
 *   <dir>/step-000120/trainer.json step, options, data-source state, history
 * Determinism: for a given thread count every native op is deterministic, the data order is seeded
 * and its position saved, so a resumed run reproduces the uninterrupted one bit for bit.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { AbortError, ArgumentError, FormatError } from '../errors.js';
import { writeFileAtomic } from '../formats/atomic.js';
import { openSafetensors, writeSafetensorsAsync } from '../formats/safetensors.js';
import { LlamaModel, type OptimizerStepOptions } from '../model/llama.js';
import { adamwStepAsync } from '../ops/adamw.js';
import { learningRate, type LrSchedule } from './schedule.js';
import { lineChart, writeSvg } from '../util/plot.js';

/**
 * What the trainer needs from a model: flat fp32 parameters and gradients (one AdamW call), an
 * accumulating forward/backward, a forward-only loss, and a checkpoint writer. LlamaModel (all
 * weights) and StitchedModel (stitch parameters only) implement it.
 */
export interface TrainableModel {
  /** Flat trainable parameters (updated in place by AdamW). */
  readonly params: Float32Array | null;
  /** Gradients, same layout, accumulated by forwardBackward. */
  readonly grads: Float32Array | null;
  /** Elements [0, nDecay) of params get weight decay. */
  readonly nDecay: number;
  /** Longest sequence the model supports. */
  readonly maxPositions: number;
  zeroGrad(): void;
  /** `step` (0-based optimizer step) seeds stochastic layers such as gate dropout. */
  forwardBackward(inputs: Int32Array, targets: Int32Array, B: number, T: number, gradScale: number, step?: number): Promise<{ lossSum: number; count: number }>;
  loss(inputs: Int32Array, targets: Int32Array, B: number, T: number): Promise<{ lossSum: number; count: number }>;
  /** Switches compute precision where supported ('f32' always is). */
  setPrecision?(precision: 'f32' | 'bf16'): void;
  /** Refreshes low-precision copies after an optimizer step. */
  syncPrecisionCopies?(): void;
  /** Writes what a checkpoint needs to rebuild the model into `dir` (a fresh folder). */
  saveCheckpointModel(dir: string): Promise<void>;
  /**
   * Optional: the model runs the AdamW step itself (and refreshes its own low-precision copies), e.g.
   * on a GPU. Without it the trainer runs ops.adamwStep on params / grads, then syncPrecisionCopies.
   */
  optimizerStep?(o: OptimizerStepOptions): Promise<{ gradNorm: number }>;
  /** With optimizerStep: brings the host moments up to date (called before every checkpoint). */
  syncMoments?(m: Float32Array, v: Float32Array): Promise<void>;
}

/** A batch of next-token examples: inputs and targets, both [B*T]. */
export interface Batch {
  inputs: Int32Array;
  targets: Int32Array;
}

/** Where training batches come from; its JSON state is saved in checkpoints. */
export interface BatchSource {
  /** The next B sequences of length T (the source's T). */
  next(B: number): Batch;
  /** A JSON-serialisable position, restored by the trainer's `data` factory. */
  state(): unknown;
}

/** One record of the loss history. */
export interface HistoryEntry {
  /** Optimizer step (1-based) after which this was measured. */
  step: number;
  /** Training tokens consumed so far. */
  tokens: number;
  /** Mean training loss over the step's tokens. */
  loss: number;
  /** Learning rate used by the step. */
  lr: number;
  /** Global gradient norm before clipping. */
  gradNorm: number;
  /** Held-out loss, when evaluated at this step. */
  evalLoss?: number;
}

/** What {@link TrainerOptions.onProgress} receives after every optimizer step. */
export interface TrainProgress extends HistoryEntry {
  totalSteps: number;
  /** Training tokens per second over this run (excluding evaluation and checkpoint time). */
  tokensPerSecond: number;
  /** Seconds since this run started. */
  elapsed: number;
  /** Estimated seconds left. */
  eta: number;
}

/** Options of {@link Trainer}. */
export interface TrainerOptions {
  /**
   * Makes the training data source: called with null for a fresh run, with the saved state on resume.
   * The source yields sequences of length `seqLen`.
   */
  data: (state: unknown) => BatchSource;
  /** Held-out batches for evaluation (each call starts from the beginning), or null. */
  evalData?: (() => Iterable<Batch>) | null;
  /** Sequences per micro-batch (B). */
  batchSize: number;
  /** Sequence length (T). */
  seqLen: number;
  /** Micro-batches per optimizer step. Default 1. */
  gradAccumSteps?: number;
  /** Total optimizer steps of the run (the cosine schedule ends there). */
  steps: number;
  /** Peak learning rate. Default 3e-4. */
  lr?: number;
  /** Warmup steps. Default min(100, steps / 10). */
  warmupSteps?: number;
  /** Final LR as a fraction of the peak. Default 0.1. */
  minLrRatio?: number;
  /** AdamW decoupled weight decay (matrices only). Default 0.1. */
  weightDecay?: number;
  /** AdamW beta1. Default 0.9. */
  beta1?: number;
  /** AdamW beta2. Default 0.95. */
  beta2?: number;
  /** AdamW epsilon. Default 1e-8. */
  eps?: number;
  /** Global gradient-norm clip; 0 disables. Default 1. */
  maxGradNorm?: number;
  /** 'f32', or 'bf16' mixed precision (bf16 block matrices, fp32 master weights). Default 'f32'. */
  precision?: 'f32' | 'bf16';
  /** Folder for checkpoints; none when absent. */
  checkpointDir?: string;
  /** Checkpoint every this many steps (and at the end, and on abort). Default 0 = only at the end. */
  checkpointEvery?: number;
  /** Checkpoints kept (older ones are deleted). Default 2. */
  keepCheckpoints?: number;
  /** Evaluate on evalData every this many steps (and at the end). Default 0 = only at the end. */
  evalEvery?: number;
  /** At most this many eval batches per evaluation. Default: all. */
  evalBatches?: number;
  /** Write the loss curve (SVG) here at every checkpoint and at the end. */
  lossCurve?: string;
  /** Title of the loss-curve image. */
  title?: string;
  /** Called after every optimizer step. */
  onProgress?: (p: TrainProgress) => void;
  /** Stops training between micro-batches (a checkpoint is written first when checkpointDir is set). */
  signal?: AbortSignal;
}

/** What {@link Trainer.run} returns. */
export interface TrainResult {
  /** Optimizer steps done in total (including those before a resume). */
  steps: number;
  /** Tokens trained on in total. */
  tokens: number;
  /** Mean loss of the last step. */
  finalLoss: number;
  /** Last held-out loss, or null. */
  evalLoss: number | null;
  /** Wall seconds of this run. */
  seconds: number;
  /** Training tokens per second of this run. */
  tokensPerSecond: number;
  history: HistoryEntry[];
}

interface TrainerState {
  step: number;
  tokens: number;
  history: HistoryEntry[];
}

const CKPT_FORMAT = 'bts-checkpoint';

function posInt(name: string, v: unknown, min = 1): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min) throw new ArgumentError(`Trainer: '${name}' must be an integer >= ${min}, got ${String(v)}`);
  return v;
}

function nonNeg(name: string, v: unknown, dflt: number): number {
  if (v === undefined) return dflt;
  if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) throw new ArgumentError(`Trainer: '${name}' must be a finite number >= 0, got ${String(v)}`);
  return v;
}

/** Continual pretraining of a LlamaModel (see the file comment). */
export class Trainer<M extends TrainableModel = LlamaModel> {
  readonly model: M;
  private readonly opts: TrainerOptions;
  private readonly schedule: LrSchedule;
  private readonly accum: number;
  private data: BatchSource;
  private m: Float32Array;
  private v: Float32Array;
  private st: TrainerState;
  /** The data position at the start of the step in progress (what a checkpoint must record). */
  private dataAtStepStart: unknown = null;

  private constructor(model: M, opts: TrainerOptions, data: BatchSource, m: Float32Array, v: Float32Array, st: TrainerState) {
    if (!model.params || !model.grads) throw new ArgumentError('Trainer: the model has no trainable parameters (load it with trainable: true)');
    posInt('batchSize', opts.batchSize);
    posInt('seqLen', opts.seqLen);
    posInt('steps', opts.steps);
    this.accum = posInt('gradAccumSteps', opts.gradAccumSteps ?? 1);
    if (opts.seqLen > model.maxPositions) throw new ArgumentError(`Trainer: seqLen ${opts.seqLen} exceeds the model's ${model.maxPositions} positions`);
    for (const k of ['lr', 'weightDecay', 'maxGradNorm', 'minLrRatio'] as const) nonNeg(k, opts[k], 0);
    for (const k of ['checkpointEvery', 'evalEvery', 'evalBatches', 'keepCheckpoints', 'warmupSteps'] as const) if (opts[k] !== undefined) posInt(k, opts[k], 0);
    if (opts.precision !== undefined && opts.precision !== 'f32' && opts.precision !== 'bf16') throw new ArgumentError(`Trainer: precision must be 'f32' or 'bf16', got '${opts.precision}'`);
    this.model = model;
    this.opts = opts;
    this.schedule = {
      peakLr: opts.lr ?? 3e-4,
      // A warmup longer than the run is cut to the run (a 1-step run warms up in its one step).
      warmupSteps: Math.min(opts.warmupSteps ?? Math.min(100, Math.floor(opts.steps / 10)), opts.steps),
      totalSteps: opts.steps,
      minLrRatio: opts.minLrRatio ?? 0.1,
      kind: 'cosine',
    };
    this.data = data;
    this.m = m;
    this.v = v;
    this.st = st;
    const precision = opts.precision ?? 'f32';
    if (model.setPrecision) model.setPrecision(precision);
    else if (precision !== 'f32') throw new ArgumentError(`Trainer: this model trains in f32 only (precision '${precision}' requested)`);
  }

  /** A fresh run on `model` (its current weights are the starting point). */
  static create<M extends TrainableModel>(model: M, options: TrainerOptions): Trainer<M> {
    const n = model.params?.length ?? 0;
    return new Trainer<M>(model, options, options.data(null), new Float32Array(n), new Float32Array(n), { step: 0, tokens: 0, history: [] });
  }

  /** True when `dir` holds a checkpoint to resume from. */
  static hasCheckpoint(dir: string): boolean {
    return fs.existsSync(path.join(dir, 'checkpoint.json'));
  }

  /**
   * Resumes from the latest checkpoint in `dir` (model, optimizer moments, step, data position,
   * history). `options` must describe the same run (same steps and schedule for the same trajectory).
   */
  static async resume(dir: string, options: TrainerOptions): Promise<Trainer<LlamaModel>>;
  static async resume<M extends TrainableModel>(dir: string, options: TrainerOptions, loadModel: (modelDir: string) => Promise<M>): Promise<Trainer<M>>;
  static async resume(dir: string, options: TrainerOptions, loadModel?: (modelDir: string) => Promise<TrainableModel>): Promise<Trainer<TrainableModel>> {
    const latest = readLatest(dir);
    const stepDir = path.join(dir, latest);
    const info = JSON.parse(fs.readFileSync(path.join(stepDir, 'trainer.json'), 'utf8')) as { format?: string; step: number; tokens: number; history: HistoryEntry[]; data: unknown };
    if (info.format !== CKPT_FORMAT || !Number.isSafeInteger(info.step)) throw new FormatError(`${stepDir}/trainer.json: not a ${CKPT_FORMAT} trainer state`);
    const model = loadModel ? await loadModel(path.join(stepDir, 'model')) : await LlamaModel.load(path.join(stepDir, 'model'), { trainable: true });
    using opt = openSafetensors(path.join(stepDir, 'optimizer.safetensors'));
    const n = model.params!.length;
    const m = Float32Array.from(opt.getF32('m'));
    const v = Float32Array.from(opt.getF32('v'));
    if (m.length !== n || v.length !== n) throw new FormatError(`${stepDir}/optimizer.safetensors: moments have ${m.length}/${v.length} elements, the model ${n}`);
    return new Trainer<TrainableModel>(model, { ...options, checkpointDir: options.checkpointDir ?? dir }, options.data(info.data), m, v, { step: info.step, tokens: info.tokens, history: info.history });
  }

  /** Optimizer steps done so far. */
  get step(): number {
    return this.st.step;
  }

  /** The loss history so far. */
  get history(): readonly HistoryEntry[] {
    return this.st.history;
  }

  /** Runs until `steps` optimizer steps are done (or the signal aborts). */
  async run(): Promise<TrainResult> {
    const o = this.opts;
    const model = this.model;
    const { batchSize: B, seqLen: T } = o;
    const t0 = performance.now();
    let trainSeconds = 0;
    let runTokens = 0;
    let lastEval: number | null = null;
    const startStep = this.st.step;
    while (this.st.step < o.steps) {
      await this.checkAbort();
      this.dataAtStepStart = JSON.parse(JSON.stringify(this.data.state() ?? null));
      const stepStart = performance.now();
      const batches: Batch[] = [];
      let count = 0;
      for (let a = 0; a < this.accum; a++) {
        const b = this.data.next(B);
        for (let i = 0; i < b.targets.length; i++) if (b.targets[i] !== -100) count++;
        batches.push(b);
      }
      model.zeroGrad();
      let lossSum = 0;
      for (const b of batches) {
        await this.checkAbort();
        const r = await model.forwardBackward(b.inputs, b.targets, B, T, count > 0 ? 1 / count : 0, this.st.step);
        lossSum += r.lossSum;
      }
      const lr = learningRate(this.schedule, this.st.step);
      const hyper = { lr, beta1: o.beta1 ?? 0.9, beta2: o.beta2 ?? 0.95, eps: o.eps ?? 1e-8, weightDecay: o.weightDecay ?? 0.1, step: this.st.step + 1, maxGradNorm: o.maxGradNorm ?? 1 };
      let gradNorm: number;
      if (model.optimizerStep) {
        gradNorm = (await model.optimizerStep({ m: this.m, v: this.v, ...hyper })).gradNorm;
      } else {
        gradNorm = (await adamwStepAsync({ params: model.params!, grads: model.grads!, m: this.m, v: this.v, nDecay: model.nDecay, ...hyper })).gradNorm;
        model.syncPrecisionCopies?.();
      }
      this.st.step++;
      this.dataAtStepStart = null;
      const stepTokens = batches.length * B * T;
      this.st.tokens += stepTokens;
      runTokens += stepTokens;
      trainSeconds += (performance.now() - stepStart) / 1000;
      const entry: HistoryEntry = { step: this.st.step, tokens: this.st.tokens, loss: count > 0 ? lossSum / count : NaN, lr, gradNorm };
      const last = this.st.step === o.steps;
      if (o.evalData && ((o.evalEvery && this.st.step % o.evalEvery === 0) || last)) {
        lastEval = await this.evaluate();
        entry.evalLoss = lastEval;
      }
      this.st.history.push(entry);
      const elapsed = (performance.now() - t0) / 1000;
      const perStep = elapsed / (this.st.step - startStep);
      o.onProgress?.({ ...entry, totalSteps: o.steps, tokensPerSecond: runTokens / Math.max(trainSeconds, 1e-9), elapsed, eta: perStep * (o.steps - this.st.step) });
      if (o.checkpointDir && ((o.checkpointEvery && this.st.step % o.checkpointEvery === 0) || last)) await this.saveCheckpoint();
    }
    if (o.lossCurve) this.writeLossCurve(o.lossCurve);
    const seconds = (performance.now() - t0) / 1000;
    const lastEntry = this.st.history[this.st.history.length - 1];
    return {
      steps: this.st.step,
      tokens: this.st.tokens,
      finalLoss: lastEntry?.loss ?? NaN,
      evalLoss: lastEval,
      seconds,
      tokensPerSecond: runTokens / Math.max(trainSeconds, 1e-9),
      history: this.st.history,
    };
  }

  /** Mean held-out loss over (at most evalBatches of) evalData. */
  async evaluate(): Promise<number> {
    const o = this.opts;
    if (!o.evalData) throw new ArgumentError('Trainer.evaluate: no evalData given');
    let sum = 0;
    let count = 0;
    let n = 0;
    for (const b of o.evalData()) {
      if (o.evalBatches && n >= o.evalBatches) break;
      const B = b.inputs.length / o.seqLen;
      const r = await this.model.loss(b.inputs, b.targets, B, o.seqLen);
      sum += r.lossSum;
      count += r.count;
      n++;
    }
    return count > 0 ? sum / count : NaN;
  }

  /** Writes a checkpoint of the current state now (see the file comment for the layout). */
  async saveCheckpoint(): Promise<string> {
    const dir = this.opts.checkpointDir;
    if (!dir) throw new ArgumentError('Trainer.saveCheckpoint: no checkpointDir given');
    fs.mkdirSync(dir, { recursive: true });
    const name = `step-${String(this.st.step).padStart(6, '0')}`;
    const final = path.join(dir, name);
    const tmp = path.join(dir, `.${name}.tmp-${process.pid}-${Date.now()}`);
    fs.rmSync(tmp, { recursive: true, force: true });
    fs.mkdirSync(tmp, { recursive: true });
    try {
      await this.model.saveCheckpointModel(path.join(tmp, 'model'));
      await this.model.syncMoments?.(this.m, this.v);
      await writeSafetensorsAsync(path.join(tmp, 'optimizer.safetensors'), {
        m: { dtype: 'F32', shape: [this.m.length], data: this.m },
        v: { dtype: 'F32', shape: [this.v.length], data: this.v },
      });
      const trainer = { format: CKPT_FORMAT, version: 1, step: this.st.step, tokens: this.st.tokens, schedule: this.schedule, data: this.dataAtStepStart ?? this.data.state(), history: this.st.history };
      writeFileAtomic(path.join(tmp, 'trainer.json'), JSON.stringify(trainer));
      fs.rmSync(final, { recursive: true, force: true });
      fs.renameSync(tmp, final);
    } catch (e) {
      fs.rmSync(tmp, { recursive: true, force: true });
      throw e;
    }
    writeFileAtomic(path.join(dir, 'checkpoint.json'), JSON.stringify({ format: CKPT_FORMAT, version: 1, latest: name }, null, 2) + '\n');
    const keep = this.opts.keepCheckpoints ?? 2;
    const old = fs
      .readdirSync(dir)
      .filter((f) => /^step-\d{6,}$/.test(f) && f !== name)
      .sort();
    for (const f of old.slice(0, Math.max(0, old.length - (keep - 1)))) fs.rmSync(path.join(dir, f), { recursive: true, force: true });
    if (this.opts.lossCurve) this.writeLossCurve(this.opts.lossCurve);
    return final;
  }

  /** Writes the loss curve (training loss per step, held-out loss where evaluated) as SVG. */
  writeLossCurve(file: string): void {
    const h = this.st.history;
    const series = [{ name: 'train loss', points: h.map((e) => [e.step, e.loss] as [number, number]) }];
    const ev = h.filter((e) => e.evalLoss !== undefined).map((e) => [e.step, e.evalLoss!] as [number, number]);
    if (ev.length) series.push({ name: 'held-out loss', points: ev });
    writeSvg(file, lineChart({ title: this.opts.title ?? 'Training loss', xLabel: 'optimizer step', yLabel: 'loss (nats/token)', series }));
  }

  private async checkAbort(): Promise<void> {
    const s = this.opts.signal;
    if (!s?.aborted) return;
    if (this.opts.checkpointDir && this.st.step > 0) await this.saveCheckpoint();
    throw new AbortError(`training aborted at step ${this.st.step}${this.opts.checkpointDir ? ` (checkpoint written to ${this.opts.checkpointDir})` : ''}`);
  }
}

/** The step folder named by `<dir>/checkpoint.json`. */
export function readLatest(dir: string): string {
  const file = path.join(dir, 'checkpoint.json');
  if (!fs.existsSync(file)) throw new FormatError(`${dir}: no checkpoint.json (not a checkpoint directory)`);
  let j: { format?: string; latest?: string };
  try {
    j = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    throw new FormatError(`${file}: not valid JSON (${(e as Error).message})`);
  }
  if (j.format !== CKPT_FORMAT || typeof j.latest !== 'string' || !/^step-\d{6,}$/.test(j.latest)) throw new FormatError(`${file}: not a ${CKPT_FORMAT} pointer`);
  if (!fs.existsSync(path.join(dir, j.latest, 'trainer.json'))) throw new FormatError(`${file}: points at ${j.latest}, which is missing or incomplete`);
  return j.latest;
}
