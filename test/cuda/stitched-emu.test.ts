// The CUDA stitched model (native/cuda/engine/stitched.cu, lib/engine/cuda-stitched.ts) against the CPU
// stitched engine (lib/engine/stitched-native.ts, itself checked against PyTorch goldens and finite
// differences in test/engine/stitched*.test.ts), run through the emulated CUDA addon bts_cuda_emu.node:
// the real engine and kernel sources executed by the SIMT emulator on the CPU. A tiny random hub and
// two experts of odd sizes (D 24, L 4, H 3, Hkv 1, Dh 8, F 40, V 41; B 2, T 5), for three placements
// (K = 2 alternating H->E / E->H with a hub bias; all E->H with the 'unchanged' expert stream; an
// E->H mid-model followed by H->E and E->H): logits, loss (per row, ignored targets), the gate record,
// every stitch gradient after two accumulated forwardBackward calls, zeroGrads; gate dropout (same
// seed -> the CPU engine's mask, other seed -> other gradients); a trained subset (only the last
// stitch); uploadWeights / downloadWeights; bad input through the TypeScript face and the raw addon
// (typed errors, the model keeps working); KV-cached prefill + batched decode over two slots of
// different lengths, truncate and reset (every placement) and the cache's typed errors (bad, full,
// duplicate slots, out-of-range tokens, foreign caches). And the one switch: StitchedModel with
// device 'cuda' trained by the unchanged Trainer follows the CPU model's loss trajectory to the same
// stitch parameters (its optimizer steps on the device), and greedy generation from it gives the CPU
// tokens; two device AdamW steps (StitchedModel.optimizerStep; clipping, weight decay, uploaded
// moments; with and without the trainableRanges of an added expert) equal ops.adamwStep; a Trainer
// checkpoint taken mid-run on CUDA resumes the uninterrupted trajectory.
//
// Skipped, saying why, when bts_cuda_emu.node is not built ($BTS_CMAKE_BUILD_DIR, default
// build-cmake; `cmake --build build-cmake --target bts_cuda_emu_node`); in CI a missing build fails.
// Tolerances: max-abs error relative to the CPU result's largest magnitude, as test/cuda/engine-emu:
// 2e-5 for logits, loss and gates, 1e-4 for gradients, 5e-4 for parameters and gradients after
// AdamW training through the Trainer (the measured errors are printed by
// BTS_TEST_VERBOSE=1 and recorded in docs/CUDA.md).
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cudaAddon, cudaStatus } from '../../lib/device.js';
import { cudaStitchedCreate, type CudaStitched } from '../../lib/engine/cuda-stitched.js';
import { stitchedCreate, type NativeStitched, type NativeStitchSpec } from '../../lib/engine/stitched-native.js';
import { ArgumentError, DisposedError, ShapeError, TokenRangeError, UnsupportedFeatureError, fromNative } from '../../lib/errors.js';
import { f32ToBf16 } from '../../lib/index.js';
import { stitchTensorNames, type StitchSpec } from '../../lib/stitch/layout.js';
import { relErr } from '../helpers.js';
import { batch, config, randomModel, randomStitches, weightsOf } from '../engine/stitched-util.js';
import { PackedLoader } from '../../lib/data/loader.js';
import { corpusFromDocuments } from '../../lib/data/tokens.js';
import { LlamaModel } from '../../lib/model/llama.js';
import { StitchedModel } from '../../lib/stitch/model.js';
import { Trainer } from '../../lib/train/trainer.js';
import { generateBatch } from '../../lib/infer/generate.js';

const root = resolve(fileURLToPath(import.meta.url), '..', '..', '..');
const buildDir = resolve(root, process.env.BTS_CMAKE_BUILD_DIR ?? 'build-cmake');
const emuPath = join(buildDir, 'bts_cuda_emu.node');
const inCI = !!process.env.CI;
const verbose = !!process.env.BTS_TEST_VERBOSE;

const TOL_OUT = 2e-5; // logits, loss, gates
const TOL_GRAD = 1e-4; // stitch gradients
// Parameters and gradients after three AdamW steps: AdamW divides by sqrt(v), so rounding in tiny
// gradients moves a parameter by up to ~lr; compared relative to the largest magnitude.
const TOL_TRAIN = 5e-4;
const maxAbsDiff = (a: Float32Array, b: Float32Array): number => a.reduce((m, x, i) => Math.max(m, Math.abs(x - b[i])), 0);

const cfg = config({ V: 41, D: 24, F: 40, L: 4, H: 3, Hkv: 1, Dh: 8, maxPos: 16 });
const V = cfg.vocabSize;
const D = cfg.hiddenSize;
const n = 2;
const [B, T] = [2, 5];

const hub = weightsOf(randomModel(cfg, 81));
const experts = [weightsOf(randomModel(cfg, 82)), weightsOf(randomModel(cfg, 83))];
const data = [batch(V, B, T, 91, [2]), batch(V, B, T, 92)];

/** Largest error seen per kind, printed at the end with BTS_TEST_VERBOSE=1. */
const worst = { out: 0, grad: 0, train: 0 };
function within(err: number, tol: number, what: string, kind: 'out' | 'grad' | 'train'): void {
  worst[kind] = Math.max(worst[kind], err);
  expect(err, what).toBeLessThan(tol);
}

/** Expects `p` to reject with an error of class `cls` whose message matches `re`. */
async function rejects(p: Promise<unknown>, cls: new (...a: never[]) => Error, re: RegExp): Promise<void> {
  const e = await p.then(
    () => null,
    (x: unknown) => x,
  );
  expect(e, `expected ${cls.name}`).toBeInstanceOf(cls);
  expect((e as Error).message).toMatch(re);
}

/** The error a raw addon call throws (or rejects with), as lib/errors.ts maps it. */
async function rawError(fn: () => unknown): Promise<Error | null> {
  try {
    await fn();
    return null;
  } catch (e) {
    return fromNative(e) as Error;
  }
}

interface Case {
  label: string;
  stitches: StitchSpec[];
  expertStream: 'projected' | 'unchanged';
  hubBias: number;
}
const cases: Case[] = [
  { label: 'K=2 alternating (H->E after 2, E->H after 4), hub bias', stitches: [{ afterBlock: 2, type: 'he' }, { afterBlock: 4, type: 'eh' }], expertStream: 'projected', hubBias: 0.4 },
  { label: 'all E->H (after 2 and 4), unchanged expert stream', stitches: [{ afterBlock: 2, type: 'eh' }, { afterBlock: 4, type: 'eh' }], expertStream: 'unchanged', hubBias: 0 },
  {
    label: 'K=3: E->H after 1, H->E after 2, E->H after 3 (expert block 4 never runs)',
    stitches: [{ afterBlock: 1, type: 'eh' }, { afterBlock: 2, type: 'he' }, { afterBlock: 3, type: 'eh' }],
    expertStream: 'projected',
    hubBias: -0.3,
  },
];

function specOf(c: Case, gateDropout = 0): NativeStitchSpec {
  return { stitches: c.stitches, expertStream: c.expertStream, hubBias: c.hubBias, gateDropout };
}

/** Zeroed host arrays for the named stitch tensors. */
function zeros(w: Record<string, Float32Array>, names: readonly string[]): Record<string, Float32Array> {
  return Object.fromEntries(names.map((k) => [k, new Float32Array(w[k].length)]));
}

/** The CPU and CUDA models over the same weights; CPU gradients for `trained` (names). */
function pair(c: Case, weights: Record<string, Float32Array>, trained: readonly string[] | null, gateDropout = 0) {
  const cg = trained ? zeros(weights, trained) : null;
  const cpu = stitchedCreate(cfg, hub, experts, specOf(c, gateDropout), weights, cg);
  const gpu = cudaStitchedCreate(cfg, hub, experts, specOf(c, gateDropout), weights, { grads: trained ? [...trained] : false });
  return { cpu, gpu, cg };
}

/** Two accumulated training steps on both engines (losses compared), then every gradient compared. */
async function compareGrads(cpu: NativeStitched, gpu: CudaStitched, cg: Record<string, Float32Array>, seeds: [number, number], label: string): Promise<void> {
  for (let i = 0; i < 2; i++) {
    const scale = 1 / (i + 2);
    const c = await cpu.forwardBackward(data[i].ids, data[i].targets, B, T, scale, seeds[i]);
    const g = await gpu.forwardBackward(data[i].ids, data[i].targets, B, T, scale, seeds[i]);
    expect(g.count).toBe(c.count);
    within(Math.abs(g.lossSum - c.lossSum) / Math.abs(c.lossSum), TOL_OUT, `${label}: loss of call ${i}`, 'out');
  }
  const gg = zeros(cg, Object.keys(cg));
  await gpu.downloadGrads(gg);
  for (const name of Object.keys(cg)) {
    expect(Math.max(...cg[name].map(Math.abs)), `${label}: ${name} has a gradient`).toBeGreaterThan(0);
    within(relErr(gg[name], cg[name]), TOL_GRAD, `${label}: ${name}`, 'grad');
  }
}

const targets: string[] = [];
if (existsSync(emuPath)) targets.push(emuPath);
else
  describe('the CUDA stitched model under the emulator', () => {
    if (inCI)
      it('is built in CI', () => {
        expect(existsSync(emuPath), `${emuPath} is not built`).toBe(true);
      });
    else it.skip(`skipped: ${emuPath} is not built (cmake --build build-cmake --target bts_cuda_emu_node)`, () => {});
  });

for (const path of targets) {
  describe('the CUDA stitched model (SIMT emulator, bts_cuda_emu.node) against the CPU stitched engine', () => {
    let saved: string | undefined;
    beforeAll(() => {
      saved = process.env.BTS_CUDA_PATH;
      process.env.BTS_CUDA_PATH = path;
      const s = cudaStatus({ refresh: true });
      expect(s.available, s.why).toBe(true);
    });
    afterAll(() => {
      if (saved === undefined) delete process.env.BTS_CUDA_PATH;
      else process.env.BTS_CUDA_PATH = saved;
      cudaStatus({ refresh: true });
      if (verbose) console.log(`stitched-emu: max relative error: logits/loss/gates ${worst.out.toExponential(2)}, gradients ${worst.grad.toExponential(2)}, after AdamW training ${worst.train.toExponential(2)}`);
    });

    cases.forEach((c, ci) => {
      const names = stitchTensorNames(D, n, c.stitches).map((t) => t.name);

      it(`${c.label}: logits, loss (per row) and the gate record equal the CPU engine`, async () => {
        const w = Object.fromEntries(randomStitches(D, n, c.stitches, 10 + ci));
        const { cpu, gpu } = pair(c, w, null);
        try {
          const lc = new Float32Array(B * T * V);
          const lg = new Float32Array(B * T * V);
          await cpu.logits(data[0].ids, B, T, lc);
          await gpu.logits(data[0].ids, B, T, lg);
          within(relErr(lg, lc), TOL_OUT, 'logits', 'out');
          const rc = new Float32Array(B * T);
          const rg = new Float32Array(B * T);
          const l1 = await cpu.loss(data[0].ids, data[0].targets, B, T, rc);
          const l2 = await gpu.loss(data[0].ids, data[0].targets, B, T, rg);
          expect(l2.count).toBe(l1.count);
          within(Math.abs(l2.lossSum - l1.lossSum) / Math.abs(l1.lossSum), TOL_OUT, 'loss', 'out');
          within(relErr(rg, rc), TOL_OUT, 'per-row losses', 'out');
          expect(rg[2]).toBe(0); // an ignored target
          const K = c.stitches.length;
          const gc = new Float32Array(K * T * (n + 1));
          const gg = new Float32Array(K * T * (n + 1));
          await cpu.gates(data[1].ids.subarray(0, T), gc);
          await gpu.gates(data[1].ids.subarray(0, T), gg);
          within(relErr(gg, gc), TOL_OUT, 'gates', 'out');
          expect(gpu.workspaceBytes()).toBeGreaterThan(0);
          expect(gpu.deviceBytes()).toBeGreaterThan(gpu.workspaceBytes());
          await rejects(gpu.forwardBackward(data[0].ids, data[0].targets, B, T, 1, 0), ArgumentError, /without gradient buffers/);
        } finally {
          cpu.dispose();
          gpu.dispose();
        }
      });

      it(`${c.label}: every stitch gradient after two accumulated forwardBackward calls, zeroGrads`, async () => {
        const w = Object.fromEntries(randomStitches(D, n, c.stitches, 20 + ci));
        const { cpu, gpu, cg } = pair(c, w, names);
        try {
          expect(gpu.gradNames()).toEqual(names);
          await compareGrads(cpu, gpu, cg!, [0, 0], c.label);
          await gpu.zeroGrads();
          const z = zeros(w, names);
          await gpu.downloadGrads(z);
          for (const name of names) expect(z[name].every((x) => x === 0), name).toBe(true);
          for (const a of Object.values(cg!)) a.fill(0);
          await cpu.forwardBackward(data[1].ids, data[1].targets, B, T, 1, 0);
          await gpu.forwardBackward(data[1].ids, data[1].targets, B, T, 1, 0);
          await gpu.downloadGrads(z);
          for (const name of names) within(relErr(z[name], cg![name]), TOL_GRAD, `${name} after zeroGrads`, 'grad');
        } finally {
          cpu.dispose();
          gpu.dispose();
        }
      });

      it(`${c.label}: prefill + batched decode over two slots of different lengths, truncate and reset equal the CPU engine`, async () => {
        const w = Object.fromEntries(randomStitches(D, n, c.stitches, 60 + ci));
        const { cpu, gpu } = pair(c, w, null);
        const cc = cpu.createCache(2, 12);
        const gc = gpu.createCache(2, 12);
        try {
          expect([gc.slots, gc.capacity]).toEqual([2, 12]);
          expect(gc.byteLength).toBe(cc.byteLength); // M caches of L * 2 * slots * capacity * Hkv * Dh floats
          const seq = [data[0].ids.slice(0, 10), data[1].ids.slice(0, 10)];
          const plen = [5, 2];
          const oc = new Float32Array(V);
          const og = new Float32Array(V);
          for (const s of [0, 1]) {
            await cpu.prefill(cc, s, seq[s].slice(0, plen[s]), oc);
            await gpu.prefill(gc, s, seq[s].slice(0, plen[s]), og);
            within(relErr(og, oc), TOL_OUT, `prefill of slot ${s}`, 'out');
          }
          const dc = new Float32Array(2 * V);
          const dg = new Float32Array(2 * V);
          for (let step = 0; step < 3; step++) {
            const slots = Int32Array.of(1, 0); // rows in another order than the slots
            const toks = Int32Array.of(seq[1][plen[1] + step], seq[0][plen[0] + step]);
            await cpu.decode(cc, slots, toks, dc);
            await gpu.decode(gc, slots, toks, dg);
            within(relErr(dg, dc), TOL_OUT, `decode step ${step}`, 'out');
          }
          expect([gc.length(0), gc.length(1)]).toEqual([8, 5]);
          // the cached logits equal the full forward of the same sequence (no cache) on the device
          const full = new Float32Array(8 * V);
          await gpu.logits(seq[0].slice(0, 8), 1, 8, full);
          const last = new Float32Array(V);
          await gpu.decode(gc, Int32Array.of(0), Int32Array.of(seq[0][8]), last);
          await cpu.decode(cc, Int32Array.of(0), Int32Array.of(seq[0][8]), oc);
          const fullNext = new Float32Array(9 * V);
          await gpu.logits(seq[0].slice(0, 9), 1, 9, fullNext);
          within(relErr(last, fullNext.subarray(8 * V)), TOL_OUT, 'decode = full forward', 'out');
          // truncate slot 0 to 3 tokens and go on with other tokens; reset slot 1 and prefill anew
          gc.truncate(0, 3);
          cc.truncate(0, 3);
          gc.reset(1);
          cc.reset(1);
          expect([gc.length(0), gc.length(1)]).toEqual([3, 0]);
          await cpu.prefill(cc, 1, seq[0].slice(0, 4), oc);
          await gpu.prefill(gc, 1, seq[0].slice(0, 4), og);
          within(relErr(og, oc), TOL_OUT, 'prefill after reset', 'out');
          const toks = Int32Array.of(seq[1][7], seq[1][8]);
          await cpu.decode(cc, Int32Array.of(0, 1), toks, dc);
          await gpu.decode(gc, Int32Array.of(0, 1), toks, dg);
          within(relErr(dg, dc), TOL_OUT, 'decode after truncate / reset', 'out');
          expect([gc.length(0), gc.length(1)]).toEqual([4, 5]);
        } finally {
          cc.dispose();
          gc.dispose();
          cpu.dispose();
          gpu.dispose();
        }
      });
    });

    it('gate dropout: the same seed gives the CPU engine\'s mask and gradients, another seed other gradients', async () => {
      const c = cases[0];
      const names = stitchTensorNames(D, n, c.stitches).map((t) => t.name);
      const w = Object.fromEntries(randomStitches(D, n, c.stitches, 30));
      const { cpu, gpu, cg } = pair(c, w, names, 0.3);
      const other = cudaStitchedCreate(cfg, hub, experts, specOf(c, 0.3), w, { grads: true });
      const plain = cudaStitchedCreate(cfg, hub, experts, specOf(c, 0), w, { grads: true });
      try {
        await compareGrads(cpu, gpu, cg!, [7, 12345678901], 'dropout 0.3');
        const a = zeros(w, names);
        const b = zeros(w, names);
        const p = zeros(w, names);
        await gpu.downloadGrads(a);
        for (let i = 0; i < 2; i++) {
          await other.forwardBackward(data[i].ids, data[i].targets, B, T, 1 / (i + 2), 8 + i);
          await plain.forwardBackward(data[i].ids, data[i].targets, B, T, 1 / (i + 2), 7);
        }
        await other.downloadGrads(b);
        await plain.downloadGrads(p);
        const gate = 'stitch.1.gate.weight';
        expect(relErr(b[gate], a[gate]), 'another seed drops other logits').toBeGreaterThan(1e-3);
        expect(relErr(p[gate], a[gate]), 'dropout changes the gradient').toBeGreaterThan(1e-3);
        // inference calls never drop: the same logits as without dropout
        const l1 = new Float32Array(B * T * V);
        const l2 = new Float32Array(B * T * V);
        await gpu.logits(data[0].ids, B, T, l1);
        await plain.logits(data[0].ids, B, T, l2);
        expect(l1).toEqual(l2);
      } finally {
        cpu.dispose();
        gpu.dispose();
        other.dispose();
        plain.dispose();
      }
    });

    it('a trained subset (only the last stitch): its gradients, the others have none; uploadWeights / downloadWeights', async () => {
      const c = cases[0];
      const all = stitchTensorNames(D, n, c.stitches).map((t) => t.name);
      const last = all.filter((name) => name.startsWith('stitch.1.'));
      const w = Object.fromEntries(randomStitches(D, n, c.stitches, 40));
      const { cpu, gpu, cg } = pair(c, w, last);
      try {
        expect(gpu.gradNames()).toEqual(last);
        await compareGrads(cpu, gpu, cg!, [0, 0], 'last stitch only');
        await rejects(gpu.downloadGrads({ 'stitch.0.gate.weight': new Float32Array(w['stitch.0.gate.weight'].length) }), ArgumentError, /has no gradient/);

        // A host-side "optimizer step" on both engines (the CPU one borrows the arrays).
        for (const name of last) for (let i = 0; i < w[name].length; i++) w[name][i] -= 0.5 * cg![name][i];
        await gpu.uploadWeights(Object.fromEntries(last.map((k) => [k, w[k]])));
        const back = zeros(w, all);
        await gpu.downloadWeights(back);
        for (const name of all) expect(back[name], name).toEqual(w[name]);
        const lc = new Float32Array(B * T * V);
        const lg = new Float32Array(B * T * V);
        await cpu.logits(data[1].ids, B, T, lc);
        await gpu.logits(data[1].ids, B, T, lg);
        within(relErr(lg, lc), TOL_OUT, 'logits after uploadWeights', 'out');
      } finally {
        cpu.dispose();
        gpu.dispose();
      }
    });

    it('bad input: typed errors from the TypeScript face and the raw addon (creation, calls, the KV cache); the model keeps working', async () => {
      const c = cases[0];
      const names = stitchTensorNames(D, n, c.stitches).map((t) => t.name);
      const w = Object.fromEntries(randomStitches(D, n, c.stitches, 50));
      // creation
      expect(() => cudaStitchedCreate(cfg, hub, experts, { ...specOf(c), stitches: [{ afterBlock: 0, type: 'eh' }] }, w)).toThrow(ArgumentError);
      expect(() => cudaStitchedCreate(cfg, hub, experts, { ...specOf(c), gateDropout: 1 }, w)).toThrow(ArgumentError);
      expect(() => cudaStitchedCreate(cfg, hub, [], specOf(c), w)).toThrow(ArgumentError);
      const missing = { ...w };
      delete missing['stitch.1.proj.0.weight'];
      expect(() => cudaStitchedCreate(cfg, hub, experts, specOf(c), missing)).toThrow(/stitch\.1\.proj\.0\.weight' is missing/);
      expect(() => cudaStitchedCreate(cfg, hub, experts, specOf(c), { ...w, 'stitch.0.gate.weight': new Float32Array(3) })).toThrow(ShapeError);
      expect(() => cudaStitchedCreate(cfg, hub, experts, specOf(c), w, { grads: ['stitch.9.gate.weight'] })).toThrow(ArgumentError);
      const bf16Hub = { ...hub, 'model.norm.weight': f32ToBf16(hub['model.norm.weight']) as unknown as Float32Array };
      expect(() => cudaStitchedCreate(cfg, bf16Hub, experts, specOf(c), w)).toThrow(UnsupportedFeatureError);

      // the raw addon refuses what the TS face would have caught, with the same codes
      const raw = cudaAddon() as unknown as { stitchedCreate: (...a: unknown[]) => unknown };
      const e1 = await rawError(() => raw.stitchedCreate(cfg, hub, experts, { ...specOf(c), stitches: [{ afterBlock: 3, type: 'eh' }, { afterBlock: 2, type: 'eh' }] }, w, {}));
      expect(e1).toBeInstanceOf(ArgumentError);
      expect(e1!.message).toMatch(/greater than the previous one/);
      const e2 = await rawError(() => raw.stitchedCreate(cfg, hub, experts, specOf(c), w, { grads: ['nope'] }));
      expect(e2).toBeInstanceOf(ArgumentError);
      const e3 = await rawError(() => raw.stitchedCreate(cfg, hub, experts, specOf(c), { ...w, 'stitch.0.gate.weight': new Float32Array(3) }, {}));
      expect(e3).toBeInstanceOf(ShapeError);
      const e4 = await rawError(() => raw.stitchedCreate(cfg, hub, [{ ...experts[0], 'model.norm.weight': new Float32Array(2) }, experts[1]], specOf(c), w, {}));
      expect(e4).toBeInstanceOf(ShapeError);
      expect(e4!.message).toMatch(/experts\[0\]/);

      const gpu = cudaStitchedCreate(cfg, hub, experts, specOf(c), w, { grads: true });
      const rawModel = (gpu as unknown as { raw: Record<string, (...a: unknown[]) => unknown> }).raw;
      try {
        const bad = Int32Array.from(data[0].ids);
        bad[3] = V;
        await rejects(gpu.loss(bad, data[0].targets, B, T), TokenRangeError, /41/);
        await rejects(gpu.forwardBackward(data[0].ids, data[0].targets, B, T + 1, 1, 0), ShapeError, /inputs/);
        await rejects(gpu.logits(data[0].ids, B, T, new Float32Array(3)), ShapeError, /out/);
        await rejects(gpu.forwardBackward(data[0].ids, data[0].targets, B, T, 1, -1), ArgumentError, /seed/);
        await rejects(gpu.uploadWeights({ 'stitch.5.gate.weight': new Float32Array(1) }), ArgumentError, /not a stitch tensor/);
        // the raw methods check as well, before anything runs
        const r1 = await rawError(() => rawModel.forwardBackward.call(rawModel, bad, data[0].targets, B, T, 1, 0));
        expect(r1).toBeInstanceOf(TokenRangeError);
        const r2 = await rawError(() => rawModel.forwardBackward.call(rawModel, data[0].ids, data[0].targets, B, T, 1, 0.5));
        expect(r2).toBeInstanceOf(ArgumentError);
        const r3 = await rawError(() => rawModel.downloadGrads.call(rawModel, { 'stitch.0.gate.weight': new Float32Array(5) }));
        expect(r3).toBeInstanceOf(ShapeError);
        const r4 = await rawError(() => rawModel.gates.call(rawModel, data[0].ids.subarray(0, T), new Float32Array(2)));
        expect(r4).toBeInstanceOf(ShapeError);
        // the KV cache: bad slot, full slot, duplicate slots, out-of-range tokens, foreign caches
        const cache = gpu.createCache(2, 4);
        const other = cudaStitchedCreate(cfg, hub, experts, specOf(c), w);
        const cpuModel = stitchedCreate(cfg, hub, experts, specOf(c), w, null);
        const o = new Float32Array(2 * V);
        try {
          await rejects(gpu.prefill(cache, 2, Int32Array.of(1, 2), o), ArgumentError, /slot 2 is out of range \[0, 2\)/);
          await rejects(gpu.prefill(cache, 0, Int32Array.of(1, V), o), TokenRangeError, /position 1 is 41/);
          await rejects(gpu.prefill(cache, 0, new Int32Array(5), o), ArgumentError, /capacity of 4/);
          await gpu.prefill(cache, 0, Int32Array.of(1, 2, 3, 4), o);
          await rejects(gpu.decode(cache, Int32Array.of(0), Int32Array.of(5), o), ArgumentError, /slot 0 is full/);
          await rejects(gpu.decode(cache, Int32Array.of(1, 1), Int32Array.of(3, 4), o), ArgumentError, /appears twice/);
          await rejects(other.prefill(cache, 1, Int32Array.of(1), o), ArgumentError, /another model/);
          await rejects(gpu.prefill(cpuModel.createCache(2, 4), 1, Int32Array.of(1), o), ArgumentError, /CudaStitchedCache/);
          expect(() => gpu.createCache(2, 17)).toThrow(ArgumentError); // capacity > maxPositionEmbeddings
          expect(() => cache.truncate(0, 5)).toThrow(ArgumentError);
          expect(cache.length(0)).toBe(4);
          expect(cache.length(1)).toBe(0);
          // the raw addon checks as well
          const rc = (rawModel.createCache as (...a: unknown[]) => object).call(rawModel, 2, 4);
          expect(await rawError(() => rawModel.prefill.call(rawModel, rc, 7, Int32Array.of(1), o))).toBeInstanceOf(ArgumentError);
          expect(await rawError(() => rawModel.decode.call(rawModel, rc, Int32Array.of(0), Int32Array.of(V + 5), o))).toBeInstanceOf(TokenRangeError);
          expect(await rawError(() => rawModel.prefill.call(rawModel, {}, 0, Int32Array.of(1), o))).toBeInstanceOf(ArgumentError);
          // still generating after all that: slot 1 of the same cache equals the CPU engine
          const cc = cpuModel.createCache(2, 4);
          const oc = new Float32Array(V);
          await cpuModel.prefill(cc, 1, Int32Array.of(3, 1, 4), oc);
          await gpu.prefill(cache, 1, Int32Array.of(3, 1, 4), o);
          within(relErr(o.subarray(0, V), oc), TOL_OUT, 'prefill after the errors', 'out');
          cc.dispose();
        } finally {
          cache.dispose();
          other.dispose();
          cpuModel.dispose();
        }
        // still works, and a gradient buffer was never touched by the failed calls
        const z = zeros(w, names);
        await gpu.downloadGrads(z);
        for (const name of names) expect(z[name].every((x) => x === 0), name).toBe(true);
        const l = await gpu.loss(data[0].ids, data[0].targets, B, T);
        expect(Number.isFinite(l.lossSum)).toBe(true);
      } finally {
        gpu.dispose();
      }
      await rejects(gpu.loss(data[0].ids, data[0].targets, B, T), DisposedError, /CudaStitched/);
    });
    it("StitchedModel with device 'cuda': the unchanged Trainer follows the CPU trajectory; greedy generation gives the CPU tokens", async () => {
      const members = (device: 'cpu' | 'cuda') => {
        const h = LlamaModel.random(cfg, { seed: 61 });
        const ex = [LlamaModel.random(cfg, { seed: 62 }), LlamaModel.random(cfg, { seed: 63 })];
        return StitchedModel.create(h, ex, { K: 2, init: 'random', seed: 5, gateDropout: 0.2, hubBias: 0.3, device });
      };
      const docs = Array.from({ length: 30 }, (_, d) => Array.from({ length: 20 + (d % 4) }, (_, i) => (d * 7 + i * (1 + (d % 3))) % (V - 1)));
      const corpus = corpusFromDocuments(docs, V, { eosId: V - 1 });
      const opts = { data: () => new PackedLoader(corpus, { T: 6, seed: 2 }), batchSize: 2, seqLen: 6, steps: 3, lr: 5e-2, warmupSteps: 1, gradAccumSteps: 2 };
      const cpu = members('cpu');
      const gpu = members('cuda');
      try {
        expect(gpu.device).toBe('cuda');
        const init = Float32Array.from(cpu.params);
        const rc = await Trainer.create(cpu, opts).run();
        const rg = await Trainer.create(gpu, opts).run();
        const lc = rc.history.map((h) => h.loss);
        const lg = rg.history.map((h) => h.loss);
        for (let i = 0; i < lc.length; i++) within(Math.abs(lg[i] - lc[i]) / Math.abs(lc[i]), TOL_OUT, `loss at step ${i}`, 'out');
        const moved = cpu.params.reduce((m, x, i) => Math.max(m, Math.abs(x - init[i])), 0);
        expect(moved, 'training moved the stitches').toBeGreaterThan(1e-3);
        within(relErr(gpu.params, cpu.params), TOL_TRAIN, 'stitch parameters after training', 'train');
        within(relErr(gpu.grads, cpu.grads), TOL_TRAIN, 'last gradients', 'train');
        // greedy generation through the device KV caches gives the CPU tokens (first call after the last
        // optimizer step: decode must use the stitches re-uploaded after syncPrecisionCopies)
        // (two prompts of different lengths: batched decode over two slots)
        const prompts = [Int32Array.of(3, 14, 15, 9), Int32Array.of(26, 5)];
        const a = await generateBatch(cpu, prompts, { maxNewTokens: 8, temperature: 0 });
        const b = await generateBatch(gpu, prompts, { maxNewTokens: 8, temperature: 0 });
        expect(a.map((r) => r.tokens.length)).toEqual([8, 8]);
        expect(b.map((r) => r.tokens)).toEqual(a.map((r) => r.tokens));
        const t = data[0].ids;
        within(relErr(await gpu.logits(t, B, T), await cpu.logits(t, B, T)), TOL_OUT, 'logits after training', 'out');
        // the Trainer stepped on the device: its moments are there until a checkpoint syncs them
        expect(() => gpu.setDevice('cpu')).toThrow(/syncMoments/);
      } finally {
        cpu.disposeAll();
        gpu.disposeAll();
      }
    });

    // The stitched model's members for the optimizer tests: saved to folders (a checkpoint's stitch.json
    // references them), shared by every StitchedModel below (frozen; the stitched engines copy or borrow
    // their weights).
    const tmp = mkdtempSync(join(tmpdir(), 'bts-stitched-emu-'));
    afterAll(() => rmSync(tmp, { recursive: true, force: true }));
    const savedModel = async (seed: number, name: string): Promise<LlamaModel> => {
      const m = LlamaModel.random(cfg, { seed });
      await m.save(join(tmp, name));
      return m;
    };
    const docs = Array.from({ length: 30 }, (_, d) => Array.from({ length: 20 + (d % 4) }, (_, i) => (d * 5 + i * (1 + (d % 3))) % (V - 1)));
    const corpus = corpusFromDocuments(docs, V, { eosId: V - 1 });

    for (const ranges of [false, true]) {
      it(`StitchedModel.optimizerStep on CUDA: two device AdamW steps equal ops.adamwStep (clipping, weight decay, uploaded moments${ranges ? ', trainableRanges of a new expert' : ''})`, async () => {
        const h = LlamaModel.random(cfg, { seed: 71 });
        const ex = [LlamaModel.random(cfg, { seed: 72 }), LlamaModel.random(cfg, { seed: 73 })];
        const extra = LlamaModel.random(cfg, { seed: 74 });
        const made: StitchedModel[] = [];
        const make = async (device: 'cpu' | 'cuda'): Promise<StitchedModel> => {
          let m = StitchedModel.create(h, ex, { K: 2, init: 'random', seed: 9, hubBias: 0.2, device });
          made.push(m);
          if (ranges) {
            m = m.addExpert(extra, 'new'); // trains only the new expert's slices
            made.push(m);
            expect(m.trainableRanges).not.toBeNull();
          }
          m.zeroGrad();
          await m.forwardBackward(data[0].ids, data[0].targets, B, T, 1 / (B * T), 0);
          return m;
        };
        try {
          const cpu = await make('cpu');
          const gpu = await make('cuda');
          expect(gpu.device).toBe('cuda');
          const nP = cpu.params.length;
          // Non-zero starting moments, so the upload is exercised; a large decay, so its extent shows.
          const m0 = new Float32Array(nP).map((_, i) => 1e-3 * Math.sin(i));
          const v0 = new Float32Array(nP).map((_, i) => 1e-5 * (1.5 + Math.cos(i)));
          const hyper = { lr: 2e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.5, maxGradNorm: 0.05 };
          const [mc, vc, mg, vg] = [m0.slice(), v0.slice(), m0.slice(), v0.slice()];
          const init = cpu.params.slice();
          for (let step = 1; step <= 2; step++) {
            const a = await cpu.optimizerStep({ m: mc, v: vc, step, ...hyper });
            const b = await gpu.optimizerStep({ m: mg, v: vg, step, ...hyper });
            expect(Math.abs(a.gradNorm - b.gradNorm), `step ${step} grad norm`).toBeLessThan(1e-5 * a.gradNorm);
            expect(a.gradNorm).toBeGreaterThan(hyper.maxGradNorm); // clipping is active
          }
          expect(maxAbsDiff(cpu.params, init)).toBeGreaterThan(1e-3);
          expect(maxAbsDiff(gpu.params, cpu.params)).toBeLessThan(1e-6);
          // Until synced, the host moments are the uploaded ones; then they are the device's.
          expect(maxAbsDiff(mg, m0)).toBe(0);
          expect(() => gpu.setDevice('cpu')).toThrow(/syncMoments/);
          await gpu.syncMoments(mg, vg);
          expect(maxAbsDiff(mg, mc)).toBeLessThan(1e-8);
          expect(maxAbsDiff(vg, vc)).toBeLessThan(1e-10);
          expect(maxAbsDiff(mc, m0)).toBeGreaterThan(1e-4);
          // the device copy of the stitches is the stepped one: logits equal the CPU model's
          within(relErr(await gpu.logits(data[1].ids, B, T), await cpu.logits(data[1].ids, B, T)), TOL_OUT, 'logits after the device steps', 'out');
          await expect(gpu.optimizerStep({ m: new Float32Array(3), v: vg, step: 3, ...hyper })).rejects.toThrow(ShapeError);
          gpu.setDevice('cpu'); // synced: allowed
        } finally {
          for (const m of made) m.dispose();
          for (const m of [h, ...ex, extra]) m.dispose();
        }
      });
    }

    it('a Trainer checkpoint taken mid-run on CUDA resumes the uninterrupted trajectory (moments synced from the device)', async () => {
      const h = await savedModel(64, 'hub');
      const ex = [await savedModel(65, 'e0'), await savedModel(66, 'e1')];
      // seed 0: StitchedModel.load does not restore the seed of gate dropout (the manifest has none)
      const make = () => StitchedModel.create(h, ex, { K: 2, init: 'random', seed: 0, gateDropout: 0.2, hubBias: 0.3, device: 'cuda' });
      const opts = { data: (st: unknown) => (st ? PackedLoader.restore(corpus, st as never) : new PackedLoader(corpus, { T: 6, seed: 4 })), batchSize: 2, seqLen: 6, steps: 4, lr: 5e-2, warmupSteps: 1, gradAccumSteps: 2 };
      const fullModel = make();
      const first = make();
      let resumed: Awaited<ReturnType<typeof Trainer.resume<StitchedModel>>> | null = null;
      try {
        const full = await Trainer.create(fullModel, opts).run();
        const dir = join(tmp, 'ckpt');
        const ac = new AbortController();
        const t1 = Trainer.create(first, { ...opts, checkpointDir: dir, signal: ac.signal, onProgress: (p) => p.step === 2 && ac.abort() });
        await expect(t1.run()).rejects.toThrow(/aborted at step 2/);
        resumed = await Trainer.resume(dir, opts, (d) => StitchedModel.load(d, { device: 'cuda' }));
        expect(resumed.model.device).toBe('cuda');
        const r = await resumed.run();
        expect(r.history.map((x) => x.loss)).toEqual(full.history.map((x) => x.loss));
        expect(maxAbsDiff(resumed.model.params, fullModel.params)).toBe(0);
      } finally {
        fullModel.dispose();
        first.dispose();
        resumed?.model.dispose();
        for (const m of [h, ...ex]) m.dispose();
      }
    });
  });
}
