/**
 * The trainer: loss falls on learnable data, gradient accumulation equals one big batch, a run
 * resumed from a checkpoint reproduces the uninterrupted run bit for bit (same loss trajectory and
 * weights), abort writes a resumable checkpoint, bf16 mixed precision tracks fp32, and the loss
 * curve image is written.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { parseLlamaConfig } from '../../lib/formats/hf-config.js';
import { LlamaModel } from '../../lib/model/llama.js';
import { Trainer, type Batch, type BatchSource } from '../../lib/train/trainer.js';
import { PackedLoader } from '../../lib/data/loader.js';
import { corpusFromDocuments } from '../../lib/data/tokens.js';
import { AbortError } from '../../lib/errors.js';

const V = 40;
const config = parseLlamaConfig({ model_type: 'llama', vocab_size: V, hidden_size: 24, intermediate_size: 40, num_hidden_layers: 2, num_attention_heads: 3, num_key_value_heads: 1, max_position_embeddings: 64 });
const T = 12;
const B = 3;

// Learnable text: repeated arithmetic-like patterns over 40 ids.
const docs = Array.from({ length: 60 }, (_, d) => Array.from({ length: 30 + (d % 7) }, (_, i) => (d * 3 + i * (1 + (d % 4))) % (V - 1)));
const corpus = corpusFromDocuments(docs, V, { eosId: V - 1 });
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'bts-trainer-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

const data = (state: unknown): BatchSource => (state ? PackedLoader.restore(corpus, state as never) : new PackedLoader(corpus, { T, seed: 3 }));
const base = { data, batchSize: B, seqLen: T, steps: 10, lr: 3e-3, warmupSteps: 2 };

describe('Trainer', () => {
  it('lowers the loss on learnable data and writes the loss curve', async () => {
    const model = LlamaModel.random(config, { seed: 1 });
    const curve = path.join(tmp, 'loss.svg');
    const seen: number[] = [];
    const tr = Trainer.create(model, { ...base, steps: 30, lossCurve: curve, onProgress: (p) => seen.push(p.step) });
    const r = await tr.run();
    expect(seen).toEqual(Array.from({ length: 30 }, (_, i) => i + 1));
    const first = r.history.slice(0, 3).reduce((a, e) => a + e.loss, 0) / 3;
    const last = r.history.slice(-3).reduce((a, e) => a + e.loss, 0) / 3;
    expect(last).toBeLessThan(first - 0.3);
    expect(fs.readFileSync(curve, 'utf8')).toMatch(/^<svg|<\?xml/);
    model.dispose();
  });

  it('accumulating 2 micro-batches of B equals one batch of 2B', async () => {
    const batches: Batch[] = [];
    const l = new PackedLoader(corpus, { T, seed: 9 });
    for (let i = 0; i < 2; i++) batches.push(l.next(B));
    const src = (list: Batch[]) => (): BatchSource => {
      let i = 0;
      return { next: () => list[i++], state: () => i };
    };
    const big: Batch = { inputs: new Int32Array([...batches[0].inputs, ...batches[1].inputs]), targets: new Int32Array([...batches[0].targets, ...batches[1].targets]) };
    const m1 = LlamaModel.random(config, { seed: 2 });
    const m2 = LlamaModel.random(config, { seed: 2 });
    await Trainer.create(m1, { ...base, data: src(batches), steps: 1, gradAccumSteps: 2 }).run();
    await Trainer.create(m2, { ...base, data: src([big]), batchSize: 2 * B, steps: 1 }).run();
    let maxDiff = 0;
    for (let i = 0; i < m1.params!.length; i++) maxDiff = Math.max(maxDiff, Math.abs(m1.params![i] - m2.params![i]));
    expect(maxDiff).toBeLessThan(1e-6);
    m1.dispose();
    m2.dispose();
  });

  it('resumes from a checkpoint on the same trajectory as an uninterrupted run', async () => {
    const full = LlamaModel.random(config, { seed: 4 });
    const ref = await Trainer.create(full, { ...base, steps: 8 }).run();
    const dir = path.join(tmp, 'ckpt');
    const a = LlamaModel.random(config, { seed: 4 });
    const ac = new AbortController();
    const first = Trainer.create(a, { ...base, steps: 8, checkpointDir: dir, checkpointEvery: 100, signal: ac.signal, onProgress: (p) => p.step === 5 && ac.abort() });
    await expect(first.run()).rejects.toThrow(AbortError);
    expect(Trainer.hasCheckpoint(dir)).toBe(true);
    const resumed = await Trainer.resume(dir, { ...base, steps: 8, checkpointDir: dir });
    expect(resumed.step).toBe(5);
    const r = await resumed.run();
    expect(r.history.map((e) => e.loss)).toEqual(ref.history.map((e) => e.loss));
    expect(Array.from(resumed.model.params!)).toEqual(Array.from(full.params!));
    // Only the newest checkpoints are kept, and the pointer names an existing folder.
    const steps = fs.readdirSync(dir).filter((f) => f.startsWith('step-'));
    expect(steps.length).toBeLessThanOrEqual(2);
    expect(fs.readdirSync(dir).some((f) => f.includes('.tmp'))).toBe(false);
    full.dispose();
    a.dispose();
    resumed.model.dispose();
  });

  it('trains in bf16 mixed precision close to fp32', async () => {
    const f = LlamaModel.random(config, { seed: 5 });
    const b = LlamaModel.random(config, { seed: 5 });
    const rf = await Trainer.create(f, { ...base, steps: 15 }).run();
    const rb = await Trainer.create(b, { ...base, steps: 15, precision: 'bf16' }).run();
    expect(b.getPrecision()).toBe('bf16');
    for (let i = 0; i < 15; i++) expect(Math.abs(rb.history[i].loss - rf.history[i].loss)).toBeLessThan(0.05 + 0.02 * i);
    expect(rb.finalLoss).toBeLessThan(rb.history[0].loss);
    f.dispose();
    b.dispose();
  });

  it('rejects bad options with typed errors', () => {
    const m = LlamaModel.random(config);
    expect(() => Trainer.create(m, { ...base, steps: 0 })).toThrow(/steps/);
    expect(() => Trainer.create(m, { ...base, seqLen: 1000 })).toThrow(/seqLen 1000/);
    expect(() => Trainer.create(m, { ...base, precision: 'f16' as never })).toThrow(/precision/);
    m.dispose();
  });
});
