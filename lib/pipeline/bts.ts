/**
 * The whole Branch-Train-Stitch method on real text, end to end, resumable: the main job of the
 * package (`bts demo`, and `bts reproduce` at a larger scale).
 *
 * Phases (each writes its outputs under `out/` and is skipped when they are already complete, so
 * rerunning the command after an interruption resumes; the training phases also resume inside a phase
 * from their checkpoints):
 *   1. data       domain corpora (english, code, math, multilingual) with train/validation/test
 *                 splits by document (lib/data/corpora; `corpusDir`)
 *   2. tokenizer  byte-level BPE trained on a sample of every domain's training split
 *   3. tokens     every domain part and split tokenized once (out/tokens/*.tok)
 *   4. seed       a Llama pretrained from scratch on a general mixture, mostly English with a little
 *                 of every domain (SEED_MIX; out/seed). The paper's seed is a pretrained generalist
 *                 whose vocabulary is trained everywhere: the hub's LM head decodes the stitched
 *                 stream, so a hub that never saw a script cannot voice an expert's tokens in it
 *                 (measured at demo scale with an English-only seed: BTS stayed 3.7-3.9 nats behind
 *                 the multilingual expert on ja/ru/zh after its stitch training)
 *   5. experts    the seed branched into code, math and multilingual experts, each continually
 *                 pretrained on its domain (out/experts/<domain>)
 *   6. dense      the dense baseline: the seed trained on the stitch datamix for the same tokens
 *   7. stitch     BTS: seed (hub) + experts frozen, stitches trained on the datamix
 *                 15/15/15/55 (code, math, multilingual, english) (out/bts)
 *   8. evaluate   held-out (test split) loss per domain and part, math exact match by greedy
 *                 generation on held-out problem families, for: seed, each expert, model soup, BTM
 *                 ensemble, dense, BTS, and BTS without the math expert (no retraining)
 *   9. report     out/results.json, out/results.md (the table, with every phase's wall time from
 *                 out/phases.json, kept across resumed invocations), out/figures/*.svg (loss curves,
 *                 the table as bars, a gate map)
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ArgumentError, FormatError } from '../errors.js';
import { writeFileAtomic } from '../formats/atomic.js';
import { buildCorpora, openCorpus, readDocuments } from '../data/corpora/build.js';
import type { Domain, SourceSpec } from '../data/corpora/types.js';
import { DOMAINS } from '../data/corpora/types.js';
import { encodeFiles, loadTokens, saveTokens, type TokenCorpus } from '../data/tokens.js';
import { extractAnswer, scoreExactMatch } from '../data/math.js';
import { LlamaModel } from '../model/llama.js';
import { llamaPreset } from '../model/presets.js';
import { parseLlamaConfig, type LlamaConfig } from '../formats/hf-config.js';
import { loadTokenizerFile, trainBpe, type BpeTokenizer } from '../tokenizer/bpe.js';
import { runTraining } from '../train/run.js';
import { StitchedModel } from '../stitch/model.js';
import { modelSoup } from '../baselines/soup.js';
import { BtmEnsemble } from '../baselines/btm.js';
import { evaluateTokens, type LossModel } from '../infer/evaluate.js';
import { generateBatch, type CausalDecoder } from '../infer/generate.js';
import { lineChart, writeSvg } from '../util/plot.js';
import { gateMap } from '../cli/stitch.js';

/** Sizes of one pipeline run. */
export interface PipelineScale {
  name: string;
  /** Seed model shape (vocab comes from the tokenizer). */
  model: { D: number; L: number; H: number; Hkv: number; F: number };
  vocabSize: number;
  /** MB of text sampled to train the tokenizer. */
  tokenizerMb: number;
  seqLen: number;
  batchSize: number;
  seedSteps: number;
  expertSteps: number;
  stitchSteps: number;
  /** Stitches K (alternating, ending with E->H). */
  K: number;
  lr: number;
  stitchLr: number;
  /** Test tokens evaluated per domain part (cap). */
  evalTokens: number;
  /** Math problems scored by exact match, and tokens generated for each. */
  mathProblems: number;
  mathMaxTokens: number;
  /** Corpus preset and cap per domain. */
  corpusPreset: 'default' | 'full';
  corpusMb?: number;
  /**
   * Also train and evaluate the ablations of the paper's table: BTS K=1, BTS all E->H, and BTS
   * without the math expert after a short retraining (stitchSteps / 4 steps at a quarter of stitchLr,
   * no warmup).
   */
  variants?: boolean;
}

/** Built-in scales: `toy` (CI, seconds), `demo` (the README's first command, <= 15 min on 2 cores). */
export const SCALES: Record<string, PipelineScale> = {
  toy: { name: 'toy', model: { D: 32, L: 2, H: 2, Hkv: 1, F: 64 }, vocabSize: 384, tokenizerMb: 0.3, seqLen: 32, batchSize: 4, seedSteps: 30, expertSteps: 100, stitchSteps: 60, K: 2, lr: 1e-2, stitchLr: 2e-2, evalTokens: 2000, mathProblems: 3, mathMaxTokens: 12, corpusPreset: 'default' },
  /**
   * The reproduce run of issue 5, sized for about two hours on 2 idle cores with the full corpora
   * (`bts data --preset full`, about 11 min of that): an 8.6M-parameter seed (config (a) of the engine
   * benchmark, vocab 8192, untied) pretrained on 9.8M tokens of the seed mix, three experts on 1.6M
   * tokens each, then the dense baseline and the stitch runs (K=4, K=1, all E->H on 1.2M tokens each
   * of the datamix, no-math retrained on a quarter of that): about 20M training tokens in all.
   * Chosen by measured speed on this machine (about 4700 training tokens/s for the seed's shape, 2300
   * for a hub + 3 experts stitch step, 12 min of evaluation) so that the whole table completes in one
   * sitting. The seed takes half the token budget: every later phase starts from it.
   */
  reproduce: { name: 'reproduce', model: { D: 256, L: 6, H: 8, Hkv: 4, F: 688 }, vocabSize: 8192, tokenizerMb: 20, seqLen: 256, batchSize: 16, seedSteps: 2400, expertSteps: 400, stitchSteps: 300, K: 4, lr: 2e-3, stitchLr: 2e-3, evalTokens: 16384, mathProblems: 96, mathMaxTokens: 96, corpusPreset: 'full', variants: true },
  demo: { name: 'demo', model: { D: 128, L: 4, H: 4, Hkv: 2, F: 352 }, vocabSize: 2048, tokenizerMb: 4, seqLen: 128, batchSize: 16, seedSteps: 1000, expertSteps: 400, stitchSteps: 500, K: 2, lr: 2e-3, stitchLr: 2e-3, evalTokens: 20000, mathProblems: 24, mathMaxTokens: 64, corpusPreset: 'default' },
};

/** Options of {@link runPipeline}. */
export interface PipelineOptions {
  /** Output folder (resumable). */
  out: string;
  /** Sizes (a name of {@link SCALES} or an object). Default 'demo'. */
  scale?: string | PipelineScale;
  /** Corpus folder; built there when missing. Default out/data. */
  corpusDir?: string;
  /** Custom corpus sources (tests); default: the scale's preset. */
  corpusSources?: SourceSpec[];
  /** Datamix of the stitch and dense phases. Default METHOD.md's 15/15/15/55. */
  mix?: Record<Domain, number>;
  /** Pretraining mixture of the seed. Default {@link SEED_MIX} (70% English, 10% of each other domain). */
  seedMix?: Record<Domain, number>;
  seed?: number;
  /** Progress lines on stderr. Default true. */
  progress?: boolean;
  /** Called when a phase starts and ends. */
  onPhase?: (phase: string, state: 'start' | 'done' | 'skipped', seconds?: number) => void;
  signal?: AbortSignal;
}

/** One row of the result table. */
export interface ResultRow {
  model: string;
  /** Mean test loss per domain (nats/token). */
  loss: Partial<Record<Domain, number>>;
  /** Test loss per domain part, e.g. multilingual/de. */
  partLoss: Record<string, number>;
  /** Math exact-match accuracy on held-out problem families, in [0, 1]. */
  mathAccuracy: number | null;
  /** Mean of the domain losses. */
  average: number;
}

/** What {@link runPipeline} returns (also written to out/results.json). */
export interface PipelineResult {
  scale: PipelineScale;
  seed: number;
  mix: Record<Domain, number>;
  rows: ResultRow[];
  phaseSeconds: Record<string, number>;
  /** Per-domain checks that the method's claims need (experts improve on their domain, ...). */
  checks: Record<string, boolean>;
  out: string;
}

export const DEFAULT_MIX: Record<Domain, number> = { code: 0.15, math: 0.15, multilingual: 0.15, english: 0.55 };

/** The seed's pretraining mixture (a generalist: mostly English, a little of every domain). */
export const SEED_MIX: Record<Domain, number> = { code: 0.1, math: 0.1, multilingual: 0.1, english: 0.7 };
const EXPERT_DOMAINS: Domain[] = ['code', 'math', 'multilingual'];
/** Held-out batches a trainer evaluates (the logged held-out loss; the table uses the test split). */
const EVAL_BATCHES = 4;

/** The first `n` tokens of a corpus (its documents cut there). */
function headOf(c: TokenCorpus, n: number): TokenCorpus {
  if (!(n < c.tokens.length)) return c;
  let d = 0;
  while (d < c.docStarts.length && c.docStarts[d] < n) d++;
  return { tokens: c.tokens.subarray(0, n), docStarts: c.docStarts.subarray(0, d), vocabSize: c.vocabSize };
}

function log(o: PipelineOptions, msg: string): void {
  if (o.progress !== false) process.stderr.write(`${msg}\n`);
}

/** Runs (or resumes) the whole pipeline; see the file comment. */
export async function runPipeline(o: PipelineOptions): Promise<PipelineResult> {
  const scale = typeof o.scale === 'object' ? o.scale : SCALES[o.scale ?? 'demo'];
  if (!scale) throw new ArgumentError(`unknown scale '${String(o.scale)}' (known: ${Object.keys(SCALES).join(', ')})`);
  const out = path.resolve(o.out);
  const seed = o.seed ?? 0;
  const mix = o.mix ?? DEFAULT_MIX;
  fs.mkdirSync(out, { recursive: true });
  // Wall time of every completed phase, kept in out/phases.json across invocations: a resumed run
  // reports the phases an earlier invocation finished too (a phase finished by resuming counts the
  // resuming invocation's time only).
  const phasesFile = path.join(out, 'phases.json');
  const phaseSeconds: Record<string, number> = readPhaseSeconds(phasesFile);
  const phase = async <T>(name: string, done: () => boolean, run: () => Promise<T>): Promise<void> => {
    if (o.signal?.aborted) throw o.signal.reason ?? new Error('aborted');
    if (done()) {
      o.onPhase?.(name, 'skipped');
      log(o, `[${name}] already done, skipped`);
      return;
    }
    log(o, `[${name}] ...`);
    o.onPhase?.(name, 'start');
    const t0 = performance.now();
    await run();
    phaseSeconds[name] = (performance.now() - t0) / 1000;
    writeFileAtomic(phasesFile, JSON.stringify(phaseSeconds, null, 1) + '\n');
    o.onPhase?.(name, 'done', phaseSeconds[name]);
    log(o, `[${name}] done in ${phaseSeconds[name].toFixed(1)} s`);
  };
  const train = (label: string) => ({ progress: o.progress, label, signal: o.signal, seqLen: scale.seqLen, batchSize: scale.batchSize, seed });

  // 1. data
  const corpusDir = path.resolve(o.corpusDir ?? path.join(out, 'data'));
  await phase('data', () => fs.existsSync(path.join(corpusDir, 'manifest.json')), async () => {
    await buildCorpora({ preset: scale.corpusPreset, out: corpusDir, seed, sources: o.corpusSources, maxMb: scale.corpusMb, signal: o.signal, onProgress: o.progress === false ? undefined : (e) => log(o, `  data: ${e.message}`) });
  });
  const corpus = openCorpus(corpusDir);
  for (const d of DOMAINS) if (!corpus.domains().includes(d)) throw new FormatError(`${corpusDir}: the corpus has no '${d}' domain (rebuild it with bts data)`);

  // 2. tokenizer
  const tokFile = path.join(out, 'tokenizer.json');
  await phase('tokenizer', () => fs.existsSync(tokFile), async () => {
    const perDomain = (scale.tokenizerMb * 1e6) / DOMAINS.length;
    const texts: string[] = [];
    for (const d of DOMAINS) {
      let budget = perDomain;
      for (const f of corpus.files(d, 'train')) {
        for (const doc of readDocuments(f)) {
          if (budget <= 0) break;
          texts.push(doc);
          budget -= Buffer.byteLength(doc);
        }
      }
    }
    const tok = await trainBpe(texts, { vocabSize: scale.vocabSize, specialTokens: ['<|begin_of_text|>', '<|end_of_text|>'], bosToken: '<|begin_of_text|>', eosToken: '<|end_of_text|>', signal: o.signal });
    tok.save(tokFile);
  });
  const tokenizer = loadTokenizerFile(tokFile);

  // 3. tokens
  const tokDir = path.join(out, 'tokens');
  const tokPath = (d: Domain, part: string, split: string): string => path.join(tokDir, `${d}.${part}.${split}.tok`);
  await phase('tokens', () => fs.existsSync(path.join(tokDir, 'done.json')), async () => {
    fs.mkdirSync(tokDir, { recursive: true });
    for (const d of DOMAINS)
      for (const part of corpus.parts(d))
        for (const split of ['train', 'validation', 'test'] as const) {
          const c = await encodeFiles(tokenizer, [corpus.file(d, part, split)], { eosId: tokenizer.eosId, splitOn: /\n\x1e\n/, invalidUtf8: 'replace', signal: o.signal });
          await saveTokens(tokPath(d, part, split), c);
        }
    writeFileAtomic(path.join(tokDir, 'done.json'), JSON.stringify({ tokenizer: tokFile }));
  });
  // A domain's split: its parts concatenated, each cut to its first `capPerPart` tokens when given.
  const tokens = async (d: Domain, split: 'train' | 'validation' | 'test', capPerPart = Infinity): Promise<TokenCorpus> => {
    const parts = await Promise.all(corpus.parts(d).map(async (p) => headOf(await loadTokens(tokPath(d, p, split)), capPerPart)));
    const { concatCorpora } = await import('../data/tokens.js');
    return concatCorpora(parts, tokenizer.vocabSize);
  };

  // The held-out sets the trainers log (validation split). A trainer evaluates its first
  // EVAL_BATCHES batches only, i.e. the first EVAL_BATCHES * B * T tokens; so every part (and, in the
  // mixture, every domain) contributes its share of that budget from its own start. A plain
  // concatenation would evaluate the first part alone (e.g. one language of the multilingual domain).
  const evalBudget = EVAL_BATCHES * scale.batchSize * scale.seqLen;
  const held = (d: Domain, share = 1): Promise<TokenCorpus> => tokens(d, 'validation', Math.ceil((evalBudget * share) / corpus.parts(d).length));

  // Domain corpora for the mixtures (seed, dense baseline, stitches).
  const mixTrain = async (): Promise<Record<string, TokenCorpus>> => Object.fromEntries(await Promise.all(DOMAINS.map(async (d) => [d, await tokens(d, 'train')] as const)));
  const mixHeld = async (): Promise<TokenCorpus> => {
    const { concatCorpora } = await import('../data/tokens.js');
    return concatCorpora(await Promise.all(DOMAINS.map((d) => held(d, 1 / DOMAINS.length))), tokenizer.vocabSize);
  };

  // 4. seed
  const config = seedConfig(scale, tokenizer);
  const seedDir = path.join(out, 'seed');
  const llamaIO = {
    saveFinal: async (m: unknown, dir: string) => (m as LlamaModel).save(dir, { dtype: 'f32' }),
    loadCheckpointModel: async (dir: string) => {
      const m = await LlamaModel.load(dir, { trainable: true });
      m.tokenizer ??= tokenizer;
      return m;
    },
  };
  await phase('seed', () => fs.existsSync(path.join(seedDir, 'train.json')), async () => {
    const model = LlamaModel.random(config, { seed, tokenizer });
    const r = await runTraining(model, { ...train('seed'), ...llamaIO, train: await mixTrain(), mixWeights: o.seedMix ?? SEED_MIX, heldOut: await held('english'), out: seedDir, steps: scale.seedSteps, lr: scale.lr, evalBatches: EVAL_BATCHES, title: 'Seed pretraining (general mixture, mostly English)' });
    (r.model as LlamaModel).dispose();
  });

  // 5. experts
  for (const d of EXPERT_DOMAINS) {
    const dir = path.join(out, 'experts', d);
    await phase(`expert:${d}`, () => fs.existsSync(path.join(dir, 'train.json')), async () => {
      const model = await LlamaModel.load(seedDir, { trainable: true }); // the branch: a copy of the seed
      const r = await runTraining(model, { ...train(`expert ${d}`), ...llamaIO, train: await tokens(d, 'train'), heldOut: await held(d), out: dir, steps: scale.expertSteps, lr: scale.lr / 2, warmupSteps: Math.max(1, Math.floor(scale.expertSteps / 20)), evalBatches: EVAL_BATCHES, title: `Expert training: ${d}` });
      (r.model as LlamaModel).dispose();
    });
  }

  // 6. dense baseline: the seed on the datamix, same tokens as the stitch phase.
  const denseDir = path.join(out, 'dense');
  await phase('dense', () => fs.existsSync(path.join(denseDir, 'train.json')), async () => {
    const model = await LlamaModel.load(seedDir, { trainable: true });
    const r = await runTraining(model, { ...train('dense'), ...llamaIO, train: await mixTrain(), mixWeights: mix, heldOut: await mixHeld(), out: denseDir, steps: scale.stitchSteps, lr: scale.lr / 2, evalBatches: EVAL_BATCHES, title: 'Dense baseline: seed on the datamix' });
    (r.model as LlamaModel).dispose();
  });

  // 7. stitch
  const btsDir = path.join(out, 'bts');
  const loadMembers = async (): Promise<{ hub: LlamaModel; experts: LlamaModel[] }> => ({
    hub: await LlamaModel.load(seedDir, { trainable: false }),
    experts: await Promise.all(EXPERT_DOMAINS.map((d) => LlamaModel.load(path.join(out, 'experts', d), { trainable: false }))),
  });
  await phase('stitch', () => fs.existsSync(path.join(btsDir, 'train.json')), async () => {
    const { hub, experts } = await loadMembers();
    const model = StitchedModel.create(hub, experts, { K: scale.K, expertNames: EXPERT_DOMAINS, seed });
    const r = await runTraining(model, {
      ...train('stitch'),
      train: await mixTrain(),
      mixWeights: mix,
      heldOut: await mixHeld(),
      out: btsDir,
      steps: scale.stitchSteps,
      lr: scale.stitchLr,
      minLrRatio: 0.01,
      weightDecay: 0,
      evalBatches: EVAL_BATCHES,
      title: `Stitch training (hub + ${experts.length} experts, K=${scale.K})`,
      saveFinal: async (m, dir) => (m as StitchedModel).save(dir),
      loadCheckpointModel: async (dir) => StitchedModel.load(dir),
    });
    (r.model as StitchedModel).disposeAll();
    if (r.model !== model) model.disposeAll();
  });

  // 7b. ablations (scale.variants): K=1, all E->H, and the math expert removed then retrained briefly.
  const variantDirs: { name: string; dir: string }[] = [];
  if (scale.variants) {
    // The retraining continues already trained stitches: it starts at a quarter of the stitch LR with
    // no warmup (a fresh warmup to the full peak undid part of the trained stitches at reproduce
    // scale: 4.626 retrained vs 4.609 without, in the 900-step run).
    const variants: { name: string; dir: string; make: () => Promise<StitchedModel>; steps: number; lr?: number; warmupSteps?: number }[] = [
      { name: 'BTS K=1', dir: path.join(out, 'bts-k1'), steps: scale.stitchSteps, make: async () => { const { hub, experts } = await loadMembers(); return StitchedModel.create(hub, experts, { K: 1, expertNames: EXPERT_DOMAINS, seed }); } },
      { name: `BTS all E->H (K=${scale.K})`, dir: path.join(out, 'bts-alleh'), steps: scale.stitchSteps, make: async () => { const { hub, experts } = await loadMembers(); return StitchedModel.create(hub, experts, { K: scale.K, pattern: 'all-eh', expertNames: EXPERT_DOMAINS, seed }); } },
      { name: 'BTS without math expert, retrained', dir: path.join(out, 'bts-nomath-retrained'), steps: Math.max(1, Math.floor(scale.stitchSteps / 4)), lr: scale.stitchLr / 4, warmupSteps: 0, make: async () => (await StitchedModel.load(btsDir)).removeExpert('math') },
    ];
    for (const v of variants) {
      variantDirs.push({ name: v.name, dir: v.dir });
      await phase(`variant:${path.basename(v.dir)}`, () => fs.existsSync(path.join(v.dir, 'train.json')), async () => {
        const model = await v.make();
        const r = await runTraining(model, {
          ...train(v.name), train: await mixTrain(), mixWeights: mix, heldOut: await mixHeld(), out: v.dir, steps: v.steps, lr: v.lr ?? scale.stitchLr, warmupSteps: v.warmupSteps, minLrRatio: 0.01, weightDecay: 0, evalBatches: EVAL_BATCHES, title: v.name,
          saveFinal: async (m, dir) => (m as StitchedModel).save(dir),
          loadCheckpointModel: async (dir) => StitchedModel.load(dir),
        });
        (r.model as StitchedModel).disposeAll();
        if (r.model !== model) model.disposeAll();
      });
    }
  }

  // 8. evaluate
  const resultsFile = path.join(out, 'results.json');
  let rows: ResultRow[] = [];
  await phase('evaluate', () => fs.existsSync(resultsFile), async () => {
    const testSets: { domain: Domain; part: string; tokens: Int32Array }[] = [];
    for (const d of DOMAINS) for (const part of corpus.parts(d)) testSets.push({ domain: d, part, tokens: (await loadTokens(tokPath(d, part, 'test'))).tokens.subarray(0, scale.evalTokens) });
    const problems = mathTestProblems(corpus, scale.mathProblems);
    const seedM = await LlamaModel.load(seedDir, { trainable: false });
    const experts = await Promise.all(EXPERT_DOMAINS.map((d) => LlamaModel.load(path.join(out, 'experts', d), { trainable: false })));
    const dense = await LlamaModel.load(denseDir, { trainable: false });
    const soup = modelSoup([seedM, ...experts]);
    const btm = new BtmEnsemble([seedM, ...experts], { mixing: 'likelihood' });
    const bts = await StitchedModel.load(btsDir);
    const btsNoMath = bts.removeExpert('math');
    const candidates: [string, LossModel & CausalDecoder][] = [
      ['seed', seedM],
      ...experts.map((e, i) => [`expert: ${EXPERT_DOMAINS[i]}`, e] as [string, LlamaModel]),
      ['model soup', soup],
      ['BTM ensemble', btm],
      ['dense (seed on datamix)', dense],
      [`BTS (K=${scale.K})`, bts],
      ['BTS without math expert', btsNoMath],
    ];
    const variantModels: StitchedModel[] = [];
    for (const v of variantDirs) {
      const m = await StitchedModel.load(v.dir);
      variantModels.push(m);
      candidates.push([v.name, m]);
    }
    rows = [];
    for (const [name, model] of candidates) {
      log(o, `  evaluating ${name}`);
      const partLoss: Record<string, number> = {};
      const sums: Partial<Record<Domain, { s: number; n: number }>> = {};
      for (const t of testSets) {
        if (t.tokens.length < 2) continue;
        const r = await evaluateTokens(model, t.tokens, { seqLen: scale.seqLen, batchSize: scale.batchSize, signal: o.signal });
        partLoss[`${t.domain}/${t.part}`] = r.loss;
        const acc = (sums[t.domain] ??= { s: 0, n: 0 });
        acc.s += r.loss * r.tokens;
        acc.n += r.tokens;
      }
      const loss: Partial<Record<Domain, number>> = {};
      for (const d of DOMAINS) if (sums[d]?.n) loss[d] = sums[d]!.s / sums[d]!.n;
      const mathAccuracy = problems.length ? await mathExactMatch(model, problems, scale.mathMaxTokens) : null;
      const vals = Object.values(loss) as number[];
      rows.push({ model: name, loss, partLoss, mathAccuracy, average: vals.reduce((a, b) => a + b, 0) / vals.length });
    }
    // Figure 3 of the paper at this scale: the gate map of a held-out text from each expert domain.
    fs.mkdirSync(path.join(out, 'figures'), { recursive: true });
    const sample = EXPERT_DOMAINS.map((d) => readDocuments(corpus.files(d, 'test')[0])[0]?.slice(0, 120) ?? '').join('\n');
    const gm = await gateMap(bts, sample, 96);
    writeSvg(path.join(out, 'figures', 'gates.svg'), gm.svg);
    btsNoMath.dispose();
    for (const m of variantModels) m.dispose();
    bts.disposeAll();
    soup.dispose();
    dense.dispose();
    for (const e of experts) e.dispose();
    seedM.dispose();
    writeFileAtomic(resultsFile, JSON.stringify({ scale, seed, mix, seedMix: o.seedMix ?? SEED_MIX, rows, phaseSeconds }, null, 1) + '\n');
  });
  const saved = JSON.parse(fs.readFileSync(resultsFile, 'utf8')) as { rows: ResultRow[]; phaseSeconds: Record<string, number> };
  rows = saved.rows;
  for (const [k, v] of Object.entries(saved.phaseSeconds ?? {})) phaseSeconds[k] ??= v;

  // 9. report
  const md = resultsMarkdown(rows, scale, phaseSeconds, o.seedMix ?? SEED_MIX);
  writeFileAtomic(path.join(out, 'results.md'), md);
  writeFigures(out, rows);
  const checks = claimChecks(rows);
  return { scale, seed, mix, rows, phaseSeconds, checks, out };
}

/** The phase wall times recorded in `file` ({} when it is missing or unreadable: they are a report, not state). */
function readPhaseSeconds(file: string): Record<string, number> {
  try {
    const v = JSON.parse(fs.readFileSync(file, 'utf8')) as unknown;
    if (!v || typeof v !== 'object' || Array.isArray(v)) return {};
    return Object.fromEntries(Object.entries(v).filter(([, x]) => typeof x === 'number' && Number.isFinite(x) && x >= 0)) as Record<string, number>;
  } catch {
    return {};
  }
}

/** The seed's Llama config at a scale. */
export function seedConfig(scale: PipelineScale, tok: BpeTokenizer): LlamaConfig {
  const m = scale.model;
  const json = {
    model_type: 'llama',
    architectures: ['LlamaForCausalLM'],
    vocab_size: tok.vocabSize,
    hidden_size: m.D,
    intermediate_size: m.F,
    num_hidden_layers: m.L,
    num_attention_heads: m.H,
    num_key_value_heads: m.Hkv,
    max_position_embeddings: Math.max(256, scale.seqLen + scale.mathMaxTokens + 256),
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    tie_word_embeddings: false,
    bos_token_id: tok.bosId,
    eos_token_id: tok.eosId,
  };
  void llamaPreset;
  return parseLlamaConfig(json, `scale '${scale.name}'`);
}

interface MathItem {
  question: string;
  answer: string;
}

function mathTestProblems(corpus: ReturnType<typeof openCorpus>, count: number): MathItem[] {
  const out: MathItem[] = [];
  for (const part of corpus.parts('math')) {
    const f = corpus.evalFile('math', part, 'test');
    if (!f) continue;
    for (const line of fs.readFileSync(f, 'utf8').split('\n')) {
      if (!line.trim()) continue;
      const j = JSON.parse(line) as { question?: string; answer?: string; meta?: { question?: string; answer?: string } };
      const q = j.question ?? j.meta?.question;
      const a = j.answer ?? j.meta?.answer;
      if (q && a) out.push({ question: q, answer: a });
      if (out.length >= count) return out;
    }
  }
  return out;
}

/** Greedy generation on each problem (prompt: question + newline); exact match of the final answer. */
async function mathExactMatch(model: CausalDecoder, problems: MathItem[], maxTokens: number): Promise<number> {
  let correct = 0;
  const batch = 8;
  for (let i = 0; i < problems.length; i += batch) {
    const chunk = problems.slice(i, i + batch);
    const res = await generateBatch(model, chunk.map((p) => `${p.question}\n`), { temperature: 0, maxNewTokens: maxTokens, stopStrings: ['\n\n'] });
    res.forEach((r, j) => {
      if (scoreExactMatch(extractAnswer(r.text), chunk[j].answer)) correct++;
    });
  }
  return correct / problems.length;
}

/** A mixture in words: "70% english, 10% code, ...". */
function mixText(mix: Record<Domain, number>): string {
  const total = Object.values(mix).reduce((a, b) => a + b, 0);
  return Object.entries(mix)
    .sort((a, b) => b[1] - a[1])
    .map(([d, w]) => `${Math.round((100 * w) / total)}% ${d}`)
    .join(', ');
}

/** The result table in markdown (the shape of the paper's Table 3). */
export function resultsMarkdown(rows: ResultRow[], scale: PipelineScale, phaseSeconds: Record<string, number>, seedMix: Record<Domain, number> = SEED_MIX): string {
  const parts = [...new Set(rows.flatMap((r) => Object.keys(r.partLoss)))].filter((p) => p.startsWith('multilingual/'));
  const head = ['model', 'english', 'code', 'math text', ...parts.map((p) => p.replace('multilingual/', 'lang ')), 'math EM', 'avg loss'];
  const best = (vals: (number | null)[], lower: boolean): number => {
    const v = vals.filter((x): x is number => x !== null && Number.isFinite(x));
    return lower ? Math.min(...v) : Math.max(...v);
  };
  const cols: ((r: ResultRow) => number | null)[] = [(r) => r.loss.english ?? null, (r) => r.loss.code ?? null, (r) => r.loss.math ?? null, ...parts.map((p) => (r: ResultRow) => r.partLoss[p] ?? null), (r) => r.mathAccuracy, (r) => r.average];
  const bests = cols.map((c, i) => best(rows.map(c), i !== cols.length - 2));
  const cell = (x: number | null, i: number): string => {
    if (x === null) return '-';
    const s = i === cols.length - 2 ? `${(x * 100).toFixed(0)}%` : x.toFixed(3);
    return x === bests[i] ? `**${s}**` : s;
  };
  const lines = [
    `Held-out (test split) loss in nats/token, lower is better; math EM = exact-match accuracy of greedy answers on held-out problem families, higher is better. Best per column in bold. Scale '${scale.name}': seed D=${scale.model.D}, L=${scale.model.L}, vocab ${scale.vocabSize}, T=${scale.seqLen}; seed ${scale.seedSteps} steps on ${mixText(seedMix)}, experts ${scale.expertSteps} each, stitches and dense ${scale.stitchSteps} (B=${scale.batchSize}).`,
    '',
    `| ${head.join(' | ')} |`,
    `|${head.map(() => '---').join('|')}|`,
    ...rows.map((r) => `| ${r.model} | ${cols.map((c, i) => cell(c(r), i)).join(' | ')} |`),
    '',
    `Phase wall times (s): ${Object.entries(phaseSeconds).map(([k, v]) => `${k} ${v.toFixed(0)}`).join(', ')}`,
    '',
  ];
  return lines.join('\n');
}

function writeFigures(out: string, rows: ResultRow[]): void {
  const dir = path.join(out, 'figures');
  fs.mkdirSync(dir, { recursive: true });
  // Loss curves of every training phase, from their train.json histories.
  const series: { name: string; points: [number, number][] }[] = [];
  for (const [name, sub] of [['seed', 'seed'], ['expert code', 'experts/code'], ['expert math', 'experts/math'], ['expert multilingual', 'experts/multilingual'], ['dense', 'dense'], ['BTS stitches', 'bts']]) {
    const f = path.join(out, sub, 'train.json');
    if (!fs.existsSync(f)) continue;
    const h = (JSON.parse(fs.readFileSync(f, 'utf8')) as { history: { step: number; loss: number }[] }).history;
    series.push({ name, points: h.map((e) => [e.step, e.loss]) });
  }
  writeSvg(path.join(dir, 'loss-curves.svg'), lineChart({ title: 'Training loss of every phase', xLabel: 'optimizer step (of that phase)', yLabel: 'loss (nats/token)', series }));
  // The table as lines over domains (one series per model).
  const domains: Domain[] = ['english', 'code', 'math', 'multilingual'];
  writeSvg(path.join(dir, 'domain-loss.svg'), lineChart({ title: 'Held-out loss per domain (lower is better)', xLabel: 'domain: 1 english, 2 code, 3 math, 4 multilingual', yLabel: 'loss (nats/token)', series: rows.map((r) => ({ name: r.model, points: domains.map((d, i) => [i + 1, r.loss[d] ?? NaN] as [number, number]) })) }));
}

/** The claims the pipeline test checks at any size. */
export function claimChecks(rows: ResultRow[]): Record<string, boolean> {
  const seed = rows.find((r) => r.model === 'seed');
  const out: Record<string, boolean> = {};
  for (const d of EXPERT_DOMAINS) {
    const e = rows.find((r) => r.model === `expert: ${d}`);
    if (seed && e && seed.loss[d] !== undefined && e.loss[d] !== undefined) out[`expert ${d} beats the seed on ${d}`] = e.loss[d]! < seed.loss[d]!;
  }
  const bts = rows.find((r) => r.model.startsWith('BTS ('));
  if (bts) out['BTS losses are finite'] = Object.values(bts.loss).every((x) => Number.isFinite(x));
  const noMath = rows.find((r) => r.model === 'BTS without math expert');
  if (noMath) out['BTS without the math expert runs'] = Object.values(noMath.loss).every((x) => Number.isFinite(x));
  return out;
}
