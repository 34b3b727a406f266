/**
 * The whole BTS pipeline at a toy size (seconds): corpora from local sources (this repository's docs
 * and sources, inline multilingual text, generated math), tokenizer, seed, three experts, dense
 * baseline, stitches, evaluation of every model and the report. Checks what must hold at any size:
 * each expert improves on its own domain over the seed, the stitched model's output is finite and its
 * loss falls during stitch training, removing an expert leaves a runnable model, a rerun resumes
 * (skips every finished phase), and the figures and table are written.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { DEFAULT_MIX, runPipeline, SCALES } from '../../lib/pipeline/bts.js';
import type { Extractor, SourceSpec } from '../../lib/data/corpora/types.js';
import { StitchedModel } from '../../lib/stitch/model.js';
import { concatCorpora, loadTokens } from '../../lib/data/tokens.js';
import { evaluateTokens } from '../../lib/infer/evaluate.js';

const out = fs.mkdtempSync(path.join(os.tmpdir(), 'bts-pipeline-'));
afterAll(() => fs.rmSync(out, { recursive: true, force: true }));
const root = fileURLToPath(new URL('../..', import.meta.url));

const LANGS: Record<string, string[]> = {
  de: ['Der Hund läuft schnell über die grüne Wiese und bellt laut.', 'Heute regnet es in Berlin, morgen scheint vielleicht die Sonne.', 'Die Katze schläft gern auf dem warmen Sofa neben dem Fenster.'],
  fr: ['Le chat dort sur le canapé pendant que la pluie tombe dehors.', 'Nous allons au marché le samedi pour acheter des légumes frais.', 'La bibliothèque de la ville ouvre ses portes à neuf heures.'],
};

const multilingual: Extractor = async function* () {
  for (const [lang, lines] of Object.entries(LANGS))
    for (let i = 0; i < 40; i++) yield { id: `${lang}-${i}`, part: lang, text: Array.from({ length: 6 }, (_, j) => lines[(i + j) % lines.length]).join(' ') + ` (${i})` };
};

const fromFiles = (dir: string, part: string, re: RegExp): Extractor =>
  async function* () {
    for (const f of fs.readdirSync(dir).filter((x) => re.test(x)).sort()) {
      const text = fs.readFileSync(path.join(dir, f), 'utf8');
      // Split long files into a few documents so every split gets some.
      const chunks = text.match(/[\s\S]{1,1500}/g) ?? [];
      for (let i = 0; i < chunks.length; i++) yield { id: `${f}#${i}`, part, text: chunks[i] };
    }
  };

const sources: SourceSpec[] = [
  { id: 'local:docs', domain: 'english', kind: 'local', path: path.join(root, 'docs'), licence: 'MIT', description: 'this repository docs', extractor: fromFiles(path.join(root, 'docs'), 'en', /\.md$/), lineDedup: false },
  { id: 'local:ops', domain: 'code', kind: 'local', path: path.join(root, 'lib', 'ops'), licence: 'MIT', description: 'this repository sources', extractor: fromFiles(path.join(root, 'lib', 'ops'), 'ts', /\.ts$/) },
  { id: 'generated:gsm', domain: 'math', kind: 'generated', licence: 'MIT', description: 'generated math', extractor: 'generated-math' },
  { id: 'inline:multi', domain: 'multilingual', kind: 'generated', licence: 'MIT', description: 'inline sentences', extractor: multilingual, languageFilter: false },
];

describe('BTS pipeline (toy scale)', () => {
  it('runs end to end and the method invariants hold', async () => {
    const phases: string[] = [];
    const r = await runPipeline({ out, scale: { ...SCALES.toy, corpusMb: 0.05 }, corpusSources: sources, progress: false, onPhase: (p, s) => s === 'done' && phases.push(p) });
    expect(phases).toEqual(['data', 'tokenizer', 'tokens', 'seed', 'expert:code', 'expert:math', 'expert:multilingual', 'dense', 'stitch', 'evaluate']);
    const names = r.rows.map((x) => x.model);
    expect(names).toEqual(['seed', 'expert: code', 'expert: math', 'expert: multilingual', 'model soup', 'BTM ensemble', 'dense (seed on datamix)', 'BTS (K=2)', 'BTS without math expert']);
    // Every expert improves on its own domain over the seed.
    for (const d of ['code', 'math', 'multilingual'] as const) {
      const seed = r.rows[0].loss[d]!;
      const e = r.rows.find((x) => x.model === `expert: ${d}`)!.loss[d]!;
      expect(e, `expert ${d} on ${d} (seed ${seed})`).toBeLessThan(seed);
    }
    expect(r.checks['BTS losses are finite']).toBe(true);
    expect(r.checks['BTS without the math expert runs']).toBe(true);
    // The stitched model's loss falls during stitch training: the loss it optimises (next-token loss
    // on the datamix, each domain weighted as in training), on a fixed sample of each domain's training
    // tokens, for the untrained stitches (the init) against the trained ones. At this size the experts
    // are barely apart from the (generalist) seed, so there is little to gain: measured 5.001 -> 4.932
    // (it saturates there; 100 stitch steps gave the same), and held-out loss moves by only a few
    // hundredths, less than a change of this repository's docs (the toy English corpus) shifts it.
    const st = JSON.parse(fs.readFileSync(path.join(out, 'bts', 'train.json'), 'utf8')) as { history: { loss: number }[] };
    expect(st.history.map((x) => x.loss).every(Number.isFinite)).toBe(true);
    const trained = await StitchedModel.load(path.join(out, 'bts'));
    const fresh = StitchedModel.create(trained.hub, trained.experts, { K: 2, expertNames: trained.expertNames });
    const mixLoss = async (m: StitchedModel): Promise<number> => {
      let sum = 0;
      for (const [d, w] of Object.entries(DEFAULT_MIX)) {
        const files = fs.readdirSync(path.join(out, 'tokens')).filter((f) => f.startsWith(`${d}.`) && f.endsWith('.train.tok'));
        const toks = concatCorpora(await Promise.all(files.map((f) => loadTokens(path.join(out, 'tokens', f))))).tokens.subarray(0, 4096);
        sum += w * (await evaluateTokens(m, toks, { seqLen: 32, batchSize: 4 })).loss;
      }
      return sum;
    };
    const before = await mixLoss(fresh);
    const after = await mixLoss(trained);
    expect(after, `datamix loss after stitch training (before: ${before})`).toBeLessThan(before - 0.02);
    fresh.dispose();
    trained.dispose();
    for (const f of ['results.md', 'results.json', 'figures/loss-curves.svg', 'figures/domain-loss.svg', 'figures/gates.svg', 'seed/loss.svg', 'bts/stitch.json']) expect(fs.existsSync(path.join(out, f))).toBe(true);
    expect(fs.readFileSync(path.join(out, 'results.md'), 'utf8')).toMatch(/\| BTS \(K=2\) \|/);
    // Rerun: every phase is skipped, the same table comes back.
    const skipped: string[] = [];
    const again = await runPipeline({ out, scale: { ...SCALES.toy, corpusMb: 0.05 }, corpusSources: sources, progress: false, onPhase: (p, s) => s === 'skipped' && skipped.push(p) });
    expect(skipped).toHaveLength(10);
    expect(again.rows).toEqual(r.rows);
    expect(again.phaseSeconds).toEqual(r.phaseSeconds);
    // A run resumed after an interruption still reports the wall time of the phases an earlier
    // invocation finished (out/phases.json), beside its own.
    fs.rmSync(path.join(out, 'results.json'));
    const resumed = await runPipeline({ out, scale: { ...SCALES.toy, corpusMb: 0.05 }, corpusSources: sources, progress: false });
    expect(Object.keys(resumed.phaseSeconds)).toEqual(phases);
    for (const p of phases.filter((x) => x !== 'evaluate')) expect(resumed.phaseSeconds[p], p).toBe(r.phaseSeconds[p]);
    expect(resumed.rows.map((x) => x.model)).toEqual(names);
    expect(fs.readFileSync(path.join(out, 'results.md'), 'utf8')).toMatch(/seed \d+, expert:code \d+/);
  }, 300_000);
});
