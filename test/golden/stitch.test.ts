// The stitched model (docs/FORMAT.md): the layout functions of lib/stitch/layout.ts, and PyTorch golden
// files (test/golden/data/tiny-stitch*, made by make_stitch_golden.py; docs/GOLDEN.md) against the
// stitched forward / backward composed from our ops (stitch-ops.ts), at every SIMD level, plus finite
// differences of the stitch gradients through the frozen blocks. Needs no torch: the goldens are
// committed.
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { ArgumentError, openSafetensors, type SimdLevel } from '../../lib/index.js';
import { checkStitchPlacement, gateRow, stitchGateName, stitchParamCount, stitchPlacement, stitchProjName, stitchTensorNames, type StitchSpec } from '../../lib/stitch/layout.js';
import { atLevel, fastLevels, randn, relErr, rng } from '../helpers.js';
import { trainStep } from './llama-ops.js';
import { loadStitched, stitchedLoss, stitchedStep, weightsSha256, type StitchedModel } from './stitch-ops.js';

const DATA = path.join(path.dirname(fileURLToPath(import.meta.url)), 'data');
const LEVELS: SimdLevel[] = [...fastLevels(), 'reference'];

// Tolerances (fp32 on both sides; docs/GOLDEN.md). Errors are max |ours - torch| / max |torch| per
// tensor (relErr; the loss: relative to the loss). Measured: <= 2.0e-6 (logits), <= 2.0e-7 (loss),
// <= 4.3e-6 (every stitch gradient) at every level here; real mistakes (gate layout, expert order,
// stitch types, stream option, hub bias) move the logits by 0.5 .. 1.5.
const TOL = { logits: 1e-5, loss: 1e-5, grad: 1e-4 };
// Finite differences (central, on the fp32 forward loss): per entry |numeric - analytic| /
// max(|numeric|, |analytic|, 1% of the tensor's largest gradient); per random direction the same
// without the floor. Measured <= 2.1e-3; a dropped backward term gives 0.2 .. 2.
const FD = { eps: 1e-2, tol: 2e-2 };

describe('stitch layout (lib/stitch/layout.ts)', () => {
  it("counts the paper's 264,241,152 parameters (D 3072, n 3, K 4)", () => {
    expect(stitchParamCount(3072, 3, 4)).toBe(264_241_152);
    // independently: the sum over the tensors the layout lists
    const specs = stitchTensorNames(3072, 3, stitchPlacement(20, 4));
    expect(specs.length).toBe(4 * (3 + 1));
    expect(specs.reduce((s, t) => s + t.shape[0] * t.shape[1], 0)).toBe(264_241_152);
    expect(stitchParamCount(32, 2, 2)).toBe(2 * (2 * 32 * 32 + 3 * 32 * 32));
  });

  it('places K stitches after every L/K blocks, alternating backwards from an E->H', () => {
    expect(stitchPlacement(20, 4)).toEqual([
      { afterBlock: 5, type: 'he' },
      { afterBlock: 10, type: 'eh' },
      { afterBlock: 15, type: 'he' },
      { afterBlock: 20, type: 'eh' },
    ]);
    expect(stitchPlacement(20, 1)).toEqual([{ afterBlock: 20, type: 'eh' }]);
    expect(stitchPlacement(4, 2)).toEqual([
      { afterBlock: 2, type: 'he' },
      { afterBlock: 4, type: 'eh' },
    ]);
    expect(stitchPlacement(20, 3)).toEqual([
      { afterBlock: 6, type: 'eh' },
      { afterBlock: 13, type: 'he' },
      { afterBlock: 20, type: 'eh' },
    ]);
  });

  it("'all-eh' makes every stitch E->H at the same positions", () => {
    expect(stitchPlacement(20, 4, 'all-eh')).toEqual([5, 10, 15, 20].map((afterBlock) => ({ afterBlock, type: 'eh' })));
    expect(stitchPlacement(7, 1, 'all-eh')).toEqual([{ afterBlock: 7, type: 'eh' }]);
  });

  it('keeps the rule for every L <= 40, K <= L: increasing, even spacing, last after block L, last E->H, alternating', () => {
    for (let L = 1; L <= 40; L++) {
      for (let K = 1; K <= L; K++) {
        const p = stitchPlacement(L, K);
        expect(p.length).toBe(K);
        expect(p[K - 1]).toEqual({ afterBlock: L, type: 'eh' });
        expect(() => checkStitchPlacement(p, L)).not.toThrow();
        for (let k = 1; k < K; k++) {
          expect(p[k].type).not.toBe(p[k - 1].type);
          const gap = p[k].afterBlock - p[k - 1].afterBlock;
          expect(gap === Math.floor(L / K) || gap === Math.ceil(L / K)).toBe(true);
        }
        if (L % K === 0) expect(p.map((s) => s.afterBlock)).toEqual(Array.from({ length: K }, (_, k) => ((k + 1) * L) / K));
      }
    }
  });

  it('names every tensor: per stitch n projections [D, D], then the gate [D*(n+1), D]', () => {
    expect(stitchTensorNames(4, 2, 2).map((t) => [t.name, t.shape])).toEqual([
      ['stitch.0.proj.0.weight', [4, 4]],
      ['stitch.0.proj.1.weight', [4, 4]],
      ['stitch.0.gate.weight', [12, 4]],
      ['stitch.1.proj.0.weight', [4, 4]],
      ['stitch.1.proj.1.weight', [4, 4]],
      ['stitch.1.gate.weight', [12, 4]],
    ]);
    expect(stitchTensorNames(4, 2, stitchPlacement(8, 2))).toEqual(stitchTensorNames(4, 2, 2));
    expect(stitchProjName(3, 1)).toBe('stitch.3.proj.1.weight');
    expect(stitchGateName(0)).toBe('stitch.0.gate.weight');
    // gate row of (d, m): model fastest
    expect(gateRow(0, 0, 2)).toBe(0);
    expect(gateRow(1, 2, 2)).toBe(5);
    expect(gateRow(3071, 3, 3)).toBe(3072 * 4 - 1);
  });

  it('refuses bad sizes and placements with an ArgumentError naming the argument', () => {
    expect(() => stitchPlacement(4, 5)).toThrow(/'K' \(5 stitches\) must be <= 'L' \(4 blocks\)/);
    expect(() => stitchPlacement(4, 0)).toThrow(ArgumentError);
    expect(() => stitchPlacement(4.5, 2)).toThrow(/'L' must be an integer >= 1, got 4.5/);
    expect(() => stitchPlacement(4, 2, 'all-he' as never)).toThrow(/'pattern'/);
    expect(() => stitchParamCount(0, 3, 4)).toThrow(/'D'/);
    expect(() => stitchParamCount(2 ** 40, 3, 4)).toThrow(/2\^53/);
    expect(() => stitchTensorNames(4, 2, [])).toThrow(/'placement'/);
    const ok: StitchSpec[] = [
      { afterBlock: 2, type: 'he' },
      { afterBlock: 4, type: 'eh' },
    ];
    expect(() => checkStitchPlacement(ok, 4)).not.toThrow();
    expect(() => checkStitchPlacement(ok, 3, 'x/stitch.json')).toThrow(/x\/stitch.json: stitches\[1\].afterBlock must be an integer in 1..3, got 4/);
    expect(() => checkStitchPlacement([ok[1], ok[0]], 4)).toThrow(/stitches\[1\].afterBlock 2 must be greater than the previous one \(4\)/);
    expect(() => checkStitchPlacement([{ afterBlock: 0, type: 'eh' }], 4)).toThrow(ArgumentError);
    expect(() => checkStitchPlacement([{ afterBlock: 1, type: 'EH' as never }], 4)).toThrow(/type must be 'eh' or 'he'/);
    expect(() => checkStitchPlacement([], 4)).toThrow(/non-empty/);
  });
});

// ---------------------------------------------------------------------------------------------------
// Goldens.

interface Golden {
  B: number;
  T: number;
  ids: Int32Array;
  targets: Int32Array;
  logits: Float32Array;
  loss: number;
  grads: Map<string, Float32Array>;
}

function loadGolden(dir: string, model: StitchedModel): Golden {
  using st = openSafetensors(path.join(dir, 'golden.safetensors'));
  const [B, T] = st.tensors.get('input_ids')!.shape;
  const grads = new Map<string, Float32Array>();
  for (const name of model.tensors.keys()) grads.set(name, Float32Array.from(st.getF32(`grad.${name}`)));
  return {
    B,
    T,
    ids: Int32Array.from(st.get('input_ids') as Int32Array),
    targets: Int32Array.from(st.get('targets') as Int32Array),
    logits: Float32Array.from(st.getF32('logits')),
    loss: st.getF32('loss')[0],
    grads,
  };
}

function errors(model: StitchedModel, g: Golden) {
  const r = stitchedStep(model, g.ids, g.targets, g.B, g.T);
  const grad: Record<string, number> = {};
  for (const [name, ref] of g.grads) grad[name] = relErr(r.grads.get(name)!, ref);
  return { logits: relErr(r.logits, g.logits), loss: Math.abs(r.loss - g.loss) / Math.abs(g.loss), grad, gradMax: Math.max(...Object.values(grad)) };
}

/** A copy of the model with copied stitch tensors and `change` applied. */
function variant(model: StitchedModel, change: Partial<StitchedModel> = {}): StitchedModel {
  const tensors = new Map([...model.tensors].map(([k, v]) => [k, v.slice()] as const));
  return { ...model, tensors, ...change };
}

/** Logits error of a mutated model against the goldens. */
function logitsErr(model: StitchedModel, g: Golden): number {
  return relErr(stitchedStep(model, g.ids, g.targets, g.B, g.T, { backward: false }).logits, g.logits);
}

// What each golden case is (make_stitch_golden.py), and the block evaluations the cost rule allows
// (summed over hub + 2 experts, L = 4): forward-only, forward keeping activations, input-gradient
// backward. tiny-stitch is the K = 2 case; k3 and k4 reach the backward paths it cannot (its
// first stitch is the H->E one and its only E->H the last).
type Blocks = { forwardOnly: number; saved: number; backward: number };
const CASES: Record<string, { stitches: StitchSpec[]; expertStream: 'projected' | 'unchanged'; hubBias: number; blocks: Blocks }> = {
  // hub and experts: blocks 1-2 forward-only, 3-4 saved and back-propagated
  'tiny-stitch': { stitches: stitchPlacement(4, 2), expertStream: 'projected', hubBias: 0, blocks: { forwardOnly: 6, saved: 6, backward: 6 } },
  // no stitch writes an expert stream: the experts run forward-only (4 blocks each), the hub as above
  'tiny-stitch-alleh': { stitches: stitchPlacement(4, 2, 'all-eh'), expertStream: 'unchanged', hubBias: 1.5, blocks: { forwardOnly: 2 + 8, saved: 2, backward: 2 } },
  // first stitch after block 1: blocks 2-4 of every model saved and back-propagated
  'tiny-stitch-k3': { stitches: stitchPlacement(4, 3), expertStream: 'projected', hubBias: 0.8, blocks: { forwardOnly: 3, saved: 9, backward: 9 } },
  'tiny-stitch-k4': { stitches: stitchPlacement(4, 4), expertStream: 'unchanged', hubBias: 0.5, blocks: { forwardOnly: 3, saved: 9, backward: 9 } },
};

for (const [name, expected] of Object.entries(CASES)) {
  describe(`golden ${name}`, () => {
    const dir = path.join(DATA, name);
    const { model, manifest } = loadStitched(dir);
    const golden = loadGolden(dir, model);
    const n = model.experts.length;
    const D = model.hub.config.hiddenSize;
    const L = model.hub.config.numHiddenLayers;

    it('has the manifest, model hashes and stitch tensors of docs/FORMAT.md', () => {
      expect(manifest.stitches).toEqual(expected.stitches);
      expect(manifest.expertStream).toBe(expected.expertStream);
      expect(manifest.hubBias).toBe(expected.hubBias);
      expect(manifest.numExperts).toBe(2);
      expect(manifest.dModel).toBe(D);
      // content hashes: the manifest's, written by Python's hashlib, against our definition
      expect(weightsSha256(path.resolve(dir, manifest.hub.path))).toBe(manifest.hub.sha256);
      for (const e of manifest.experts) expect(weightsSha256(path.resolve(dir, e.path))).toBe(e.sha256);
      expect(new Set([manifest.hub.sha256, ...manifest.experts.map((e) => e.sha256)]).size).toBe(3);
      // the file holds exactly the layout's tensors, in its order, F32
      using st = openSafetensors(path.join(dir, 'stitches.safetensors'));
      const specs = stitchTensorNames(D, n, manifest.stitches);
      expect([...st.tensors.keys()]).toEqual(specs.map((s) => s.name));
      for (const s of specs) expect(st.tensors.get(s.name)!.dtype).toBe('F32');
      expect(specs.reduce((s, t) => s + t.shape[0] * t.shape[1], 0)).toBe(stitchParamCount(D, n, manifest.stitches.length));
      expect(golden.logits.length).toBe(golden.B * golden.T * model.hub.config.vocabSize);
      expect(golden.targets).toContain(-100);
    });

    for (const level of LEVELS) {
      it(`matches PyTorch at level ${level}: hub logits, loss, every stitch gradient`, () => {
        const e = atLevel(level, () => errors(model, golden));
        const g = Object.entries(e.grad).map(([k, v]) => `${k.replace(/^stitch\.|\.weight$/g, '')} ${v.toExponential(1)}`);
        console.log(`${name} @${level}: logits ${e.logits.toExponential(2)} loss ${e.loss.toExponential(2)} grad max ${e.gradMax.toExponential(2)} (${g.join(', ')})`);
        expect(e.logits).toBeLessThanOrEqual(TOL.logits);
        expect(e.loss).toBeLessThanOrEqual(TOL.loss);
        for (const [k, err] of Object.entries(e.grad)) expect(err, `grad.${k}`).toBeLessThanOrEqual(TOL.grad);
      });
    }

    it('follows the cost rule: forward-only blocks up to the first stitch, input-gradient-only blocks after it', () => {
      const r = stitchedStep(model, golden.ids, golden.targets, golden.B, golden.T);
      expect(r.blocks).toEqual(expected.blocks);
      expect([...r.grads.keys()]).toEqual(stitchTensorNames(D, n, manifest.stitches).map((s) => s.name)); // no other weight gradient
      const fwd = stitchedStep(model, golden.ids, golden.targets, golden.B, golden.T, { backward: false });
      expect(fwd.blocks).toEqual({ forwardOnly: L * (n + 1), saved: 0, backward: 0 });
      expect(fwd.loss).toBe(r.loss);
    });

    if (manifest.stitches.some((s) => s.type === 'he')) {
      it("leaves the hub's rows of an H->E gate unused (zero gradient in PyTorch and here)", () => {
        const grads = stitchedStep(model, golden.ids, golden.targets, golden.B, golden.T).grads;
        manifest.stitches.forEach((spec, k) => {
          if (spec.type !== 'he') return;
          const ours = grads.get(stitchGateName(k))!;
          const ref = golden.grads.get(stitchGateName(k))!;
          let other = 0;
          for (let d = 0; d < D; d++)
            for (let m = 0; m <= n; m++)
              for (let i = 0; i < D; i++) {
                const r = gateRow(d, m, n) * D + i;
                if (m === 0) {
                  expect(ours[r]).toBe(0);
                  expect(ref[r]).toBe(0);
                } else other = Math.max(other, Math.abs(ref[r]));
              }
          expect(other).toBeGreaterThan(0);
        });
      });
    }

    it('agrees with finite differences of the loss through the frozen blocks', () => {
      const { ids, targets, B, T } = golden;
      const m = variant(model);
      const r = stitchedStep(m, ids, targets, B, T);
      const f = () => stitchedLoss(m, ids, targets, B, T);
      const pick = rng(name.length * 31 + 5);
      let worst = 0;
      let worstDir = 0;
      for (const [tname, grad] of r.grads) {
        const w = m.tensors.get(tname)!;
        let scale = 0;
        let top = 0;
        for (let i = 0; i < grad.length; i++) if (Math.abs(grad[i]) > scale) [scale, top] = [Math.abs(grad[i]), i];
        // entries: the largest gradient, and a random one whose gradient is not negligible
        const idx = [top];
        while (idx.length < 2) {
          const i = Math.floor(pick() * grad.length);
          if (Math.abs(grad[i]) > 0.05 * scale) idx.push(i);
        }
        for (const i of idx) {
          const old = w[i];
          w[i] = old + FD.eps;
          const fp = f();
          w[i] = old - FD.eps;
          const fm = f();
          w[i] = old;
          const num = (fp - fm) / (2 * FD.eps);
          worst = Math.max(worst, Math.abs(num - grad[i]) / Math.max(Math.abs(num), Math.abs(grad[i]), 0.01 * scale));
        }
        // and one random direction over the whole tensor (every entry at once)
        const u = randn(w.length, tname.length * 7 + 1);
        const eps = 1e-3;
        const orig = w.slice();
        for (let i = 0; i < w.length; i++) w[i] = orig[i] + eps * u[i];
        const fp = f();
        for (let i = 0; i < w.length; i++) w[i] = orig[i] - eps * u[i];
        const fm = f();
        w.set(orig);
        let dd = 0;
        for (let i = 0; i < w.length; i++) dd += grad[i] * u[i];
        const num = (fp - fm) / (2 * eps);
        worstDir = Math.max(worstDir, Math.abs(num - dd) / Math.max(Math.abs(num), Math.abs(dd)));
      }
      console.log(`${name}: finite differences, worst entry ${worst.toExponential(2)}, worst direction ${worstDir.toExponential(2)}`);
      expect(worst).toBeLessThanOrEqual(FD.tol);
      expect(worstDir).toBeLessThanOrEqual(FD.tol);
    });

    // The comparison must be able to fail: classic mistakes, emulated through the weights or options,
    // are far outside the tolerances.
    it('catches a gate read model-major ([n+1, D] instead of [D, n+1])', () => {
      const M = n + 1;
      const bad = variant(model);
      for (let k = 0; k < manifest.stitches.length; k++) {
        const w = model.tensors.get(stitchGateName(k))!;
        const out = bad.tensors.get(stitchGateName(k))!;
        for (let d = 0; d < D; d++) for (let m = 0; m < M; m++) out.set(w.subarray((m * D + d) * D, (m * D + d + 1) * D), (d * M + m) * D);
      }
      expect(logitsErr(bad, golden)).toBeGreaterThan(100 * TOL.logits);
    });

    it('catches experts in the wrong order', () => {
      expect(logitsErr(variant(model, { experts: [...model.experts].reverse() }), golden)).toBeGreaterThan(100 * TOL.logits);
    });

    it('catches swapped stitch types', () => {
      const swapped = model.stitches.map((s) => ({ ...s, type: s.type === 'eh' ? ('he' as const) : ('eh' as const) }));
      expect(logitsErr(variant(model, { stitches: swapped }), golden)).toBeGreaterThan(100 * TOL.logits);
    });

    if (expected.hubBias !== 0) {
      it('catches an ignored hub bias, and one of the wrong sign', () => {
        expect(logitsErr(variant(model, { hubBias: 0 }), golden)).toBeGreaterThan(100 * TOL.logits);
        expect(logitsErr(variant(model, { hubBias: -expected.hubBias }), golden)).toBeGreaterThan(100 * TOL.logits);
      });
    }

    // the expert stream matters only where an E->H stitch is followed by another stitch
    if (manifest.stitches.slice(0, -1).some((s) => s.type === 'eh')) {
      it('catches the other expert stream', () => {
        const other = expected.expertStream === 'projected' ? 'unchanged' : 'projected';
        expect(logitsErr(variant(model, { expertStream: other }), golden)).toBeGreaterThan(100 * TOL.logits);
      });
    }
  });
}

describe('weightsSha256 (the manifest hash of docs/FORMAT.md)', () => {
  it('hashes the shards of an index in file-name order, each once, and nothing else', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bts-sha-'));
    try {
      const a = Buffer.from('first shard bytes');
      const b = Buffer.from('second shard');
      fs.writeFileSync(path.join(dir, 'model-00001-of-00002.safetensors'), a);
      fs.writeFileSync(path.join(dir, 'model-00002-of-00002.safetensors'), b);
      fs.writeFileSync(path.join(dir, 'config.json'), '{}');
      const map = { 'y.weight': 'model-00002-of-00002.safetensors', 'x.weight': 'model-00001-of-00002.safetensors', 'z.weight': 'model-00002-of-00002.safetensors' };
      fs.writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: {}, weight_map: map }));
      const expected = createHash('sha256').update(Buffer.concat([a, b])).digest('hex');
      expect(weightsSha256(dir)).toBe(expected);
      fs.writeFileSync(path.join(dir, 'config.json'), '{"changed": true}');
      expect(weightsSha256(dir)).toBe(expected);
      fs.writeFileSync(path.join(dir, 'model-00002-of-00002.safetensors'), Buffer.from('second shard!'));
      expect(weightsSha256(dir)).not.toBe(expected);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('stitched oracle', () => {
  const { model } = loadStitched(path.join(DATA, 'tiny-stitch'));
  const c = model.hub.config;
  const D = c.hiddenSize;
  const B = 2;
  const T = 5;
  const r = rng(99);
  const ids = Int32Array.from({ length: B * T }, () => Math.floor(r() * c.vocabSize));
  const targets = Int32Array.from({ length: B * T }, (_, i) => (i % T === T - 1 ? -100 : ids[i + 1]));

  it("gives the hub's own logits and loss when the experts are copies of the hub and the projections identities", () => {
    const plain = trainStep(model.hub, ids, targets, B, T);
    const placements: StitchSpec[][] = [stitchPlacement(4, 2), stitchPlacement(4, 4, 'all-eh'), stitchPlacement(4, 3), [{ afterBlock: 1, type: 'he' }]];
    for (const stitches of placements) {
      for (const expertStream of ['projected', 'unchanged'] as const) {
        const tensors = new Map<string, Float32Array>();
        for (const s of stitchTensorNames(D, 2, stitches)) {
          if (s.kind === 'gate') tensors.set(s.name, randn(s.shape[0] * s.shape[1], s.stitch + 11, -0.5, 0.5));
          else {
            const eye = new Float32Array(D * D);
            for (let i = 0; i < D; i++) eye[i * D + i] = 1;
            tensors.set(s.name, eye);
          }
        }
        const same: StitchedModel = { hub: model.hub, experts: [model.hub, model.hub], stitches, expertStream, hubBias: 0.7, tensors };
        const s = stitchedStep(same, ids, targets, B, T);
        expect(relErr(s.logits, plain.logits), JSON.stringify({ stitches, expertStream })).toBeLessThanOrEqual(1e-5);
        expect(Math.abs(s.loss - plain.loss) / plain.loss).toBeLessThanOrEqual(1e-5);
      }
    }
  });

  it('gives zero gradients to an H->E stitch with no E->H after it, and skips the dead expert blocks', () => {
    const stitches: StitchSpec[] = [
      { afterBlock: 1, type: 'eh' },
      { afterBlock: 3, type: 'he' },
    ];
    const tensors = new Map<string, Float32Array>();
    for (const s of stitchTensorNames(D, 2, stitches)) tensors.set(s.name, randn(s.shape[0] * s.shape[1], s.name.length, -0.2, 0.2));
    const m: StitchedModel = { ...model, stitches, tensors };
    const res = stitchedStep(m, ids, targets, B, T);
    for (const s of stitchTensorNames(D, 2, stitches)) {
      const g = res.grads.get(s.name)!;
      if (s.stitch === 1) expect(g.every((x) => x === 0), s.name).toBe(true);
      else expect(g.some((x) => x !== 0), s.name).toBe(true);
    }
    // hub: 1 forward-only + 3 saved, 3 backward; experts: blocks 1..3 forward-only (block 4 not run), no backward
    expect(res.blocks).toEqual({ forwardOnly: 1 + 2 * 3, saved: 3, backward: 3 });
  });
});
