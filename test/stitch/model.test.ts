/**
 * The TypeScript side of the stitched model that needs no native call: parameter layout and count,
 * init rule, expert removal and addition (slice bookkeeping), manifest and hash validation.
 * The numerics (forward, backward, decode) are tested against the PyTorch goldens in
 * test/engine/stitched*.test.ts.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { parseLlamaConfig } from '../../lib/formats/hf-config.js';
import { LlamaModel } from '../../lib/model/llama.js';
import { StitchedModel, modelWeightsSha256, readManifest } from '../../lib/stitch/model.js';
import { gateRow, stitchParamCount } from '../../lib/stitch/layout.js';
import { modelSoup } from '../../lib/baselines/soup.js';

const config = parseLlamaConfig({ model_type: 'llama', vocab_size: 50, hidden_size: 12, intermediate_size: 20, num_hidden_layers: 4, num_attention_heads: 3, num_key_value_heads: 1, max_position_embeddings: 64 });

function models(n: number): LlamaModel[] {
  return Array.from({ length: n }, (_, i) => LlamaModel.random(config, { seed: i + 1 }));
}

describe('StitchedModel layout and init', () => {
  it('has the paper layout: n projections and an (n+1)D x D gate per stitch', () => {
    const [hub, ...ex] = models(4);
    const m = StitchedModel.create(hub, ex, { K: 2 });
    expect(m.numParams).toBe(stitchParamCount(12, 3, 2));
    expect(m.placement).toEqual([{ afterBlock: 2, type: 'he' }, { afterBlock: 4, type: 'eh' }]);
    expect(m.tensors.map((t) => t.name)).toEqual([
      'stitch.0.proj.0.weight', 'stitch.0.proj.1.weight', 'stitch.0.proj.2.weight', 'stitch.0.gate.weight',
      'stitch.1.proj.0.weight', 'stitch.1.proj.1.weight', 'stitch.1.proj.2.weight', 'stitch.1.gate.weight',
    ]);
    // identity projections, zero gates
    const p = m.tensor(1, 'proj', 2);
    for (let i = 0; i < 12; i++) for (let j = 0; j < 12; j++) expect(p[i * 12 + j]).toBe(i === j ? 1 : 0);
    expect(m.tensor(0, 'gate').every((x) => x === 0)).toBe(true);
  });

  it('refuses experts of another architecture, naming the field', () => {
    const hub = LlamaModel.random(config);
    const other = LlamaModel.random({ ...config, intermediateSize: 24 });
    expect(() => StitchedModel.create(hub, [other])).toThrow(/expert 0 .*intermediateSize: 24 vs 20/);
  });

  it('removeExpert drops exactly that expert\'s projections and gate rows', () => {
    const [hub, ...ex] = models(4);
    const m = StitchedModel.create(hub, ex, { K: 2, init: 'random', seed: 3 });
    const r = m.removeExpert('expert-1');
    expect(r.expertNames).toEqual(['expert-0', 'expert-2']);
    expect(r.numParams).toBe(stitchParamCount(12, 2, 2));
    for (const k of [0, 1]) {
      expect(Array.from(r.tensor(k, 'proj', 0))).toEqual(Array.from(m.tensor(k, 'proj', 0)));
      expect(Array.from(r.tensor(k, 'proj', 1))).toEqual(Array.from(m.tensor(k, 'proj', 2)));
      const gOld = m.tensor(k, 'gate');
      const gNew = r.tensor(k, 'gate');
      for (let d = 0; d < 12; d++) {
        const rowsOld = [0, 1, 3]; // hub, expert 0 (model 1), expert 2 (model 3)
        rowsOld.forEach((mOld, mNew) => {
          expect(Array.from(gNew.subarray(gateRow(d, mNew, 2) * 12, gateRow(d, mNew, 2) * 12 + 12))).toEqual(Array.from(gOld.subarray(gateRow(d, mOld, 3) * 12, gateRow(d, mOld, 3) * 12 + 12)));
        });
      }
    }
    expect(() => r.removeExpert('nope')).toThrow(/no expert/);
  });

  it('addExpert keeps the old slices, initialises the new ones, and masks training to them', () => {
    const [hub, a, b, c] = models(4);
    const m = StitchedModel.create(hub, [a, b], { K: 2, init: 'random', seed: 5 });
    const added = m.addExpert(c, 'new');
    expect(added.expertNames).toEqual(['expert-0', 'expert-1', 'new']);
    const D = 12;
    for (const k of [0, 1]) {
      expect(Array.from(added.tensor(k, 'proj', 1))).toEqual(Array.from(m.tensor(k, 'proj', 1)));
      const pn = added.tensor(k, 'proj', 2);
      for (let i = 0; i < D; i++) for (let j = 0; j < D; j++) expect(pn[i * D + j]).toBe(i === j ? 1 : 0);
      const g = added.tensor(k, 'gate');
      const gOld = m.tensor(k, 'gate');
      for (let d = 0; d < D; d++) {
        for (let mm = 0; mm < 3; mm++) expect(Array.from(g.subarray(gateRow(d, mm, 3) * D, gateRow(d, mm, 3) * D + D))).toEqual(Array.from(gOld.subarray(gateRow(d, mm, 2) * D, gateRow(d, mm, 2) * D + D)));
        expect(g.subarray(gateRow(d, 3, 3) * D, gateRow(d, 3, 3) * D + D).every((x) => x === 0)).toBe(true);
      }
    }
    // The trainable ranges cover exactly the new projections and the new gate rows.
    const covered = new Uint8Array(added.numParams);
    for (const [off, len] of added.trainableRanges!) covered.fill(1, off, off + len);
    const expected = 2 * (D * D + D * D); // per stitch: one projection + D gate rows of D
    expect(covered.reduce((s, x) => s + x, 0)).toBe(expected);
  });

  it('saves a manifest with hashes and refuses changed models on load', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bts-stitch-'));
    try {
      const [hub, e0] = models(2);
      await hub.save(path.join(dir, 'hub'));
      await e0.save(path.join(dir, 'e0'));
      const m = StitchedModel.create(hub, [e0], { K: 1, expertNames: ['code'], seed: 7, gateDropout: 0.1 });
      await m.save(path.join(dir, 'stitched'));
      const man = readManifest(path.join(dir, 'stitched'));
      // The dropout seed round-trips, so a resumed stitch training draws the same masks.
      expect(man.seed).toBe(7);
      const back = await StitchedModel.load(path.join(dir, 'stitched'));
      expect([back.seed, back.gateDropout]).toEqual([7, 0.1]);
      back.dispose();
      expect(man.hub.path).toBe('../hub');
      expect(man.experts[0]).toMatchObject({ name: 'code', path: '../e0', sha256: modelWeightsSha256(path.join(dir, 'e0')) });
      expect(man.stitches).toEqual([{ afterBlock: 4, type: 'eh' }]);
      // Change the expert: loading must refuse.
      await LlamaModel.random(config, { seed: 99 }).save(path.join(dir, 'e0'));
      await expect(StitchedModel.load(path.join(dir, 'stitched'))).rejects.toThrow(/expert 'code' .* changed/);
      // A broken manifest is a FormatError naming the field.
      fs.writeFileSync(path.join(dir, 'stitched', 'stitch.json'), JSON.stringify({ ...man, stitches: [{ afterBlock: 'x', type: 'eh' }] }));
      expect(() => readManifest(path.join(dir, 'stitched'))).toThrow(/stitches\[0\]/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('model soup', () => {
  it('is the weighted element-wise mean', () => {
    const [a, b] = models(2);
    const s = modelSoup([a, b], [1, 3]);
    const name = 'model.layers.1.mlp.up_proj.weight';
    const [x, y, z] = [a.tensorF32(name), b.tensorF32(name), s.tensorF32(name)];
    for (let i = 0; i < z.length; i += 17) expect(z[i]).toBeCloseTo(0.25 * x[i] + 0.75 * y[i], 6);
    expect(() => modelSoup([a, LlamaModel.random({ ...config, numHiddenLayers: 3 })])).toThrow(/numHiddenLayers/);
  });
});
