/**
 * The BTS commands: `bts branch` (copy a seed into an expert), `bts stitch` (train stitch layers on a
 * datamix; also remove or add an expert), `bts gates` (the gate map of a text, as an image) and
 * `bts merge` (model soup). Training an expert is `bts train --model <branch>`.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { ArgumentError } from '../errors.js';
import { copyFileAtomic } from '../formats/atomic.js';
import { splitCorpus, type TokenCorpus } from '../data/tokens.js';
import { LlamaModel } from '../model/llama.js';
import { StitchedModel, modelWeightsSha256 } from '../stitch/model.js';
import { modelSoup } from '../baselines/soup.js';
import { heatmap, writeSvg } from '../util/plot.js';
import { setThreads } from '../runtime.js';
import { runTraining } from '../train/run.js';
import type { CliCommand } from './command.js';
import { intArg, numArg } from './tokenizer.js';
import { corpusOf, trainingParseOptions } from './train.js';
import { registerStitchedOpener } from './generate.js';

// StitchedModel.load owns the hub and experts it loads: dispose() frees them all.
registerStitchedOpener(async (dir, dtype) => StitchedModel.load(dir, { dtype }));

// ---------------------------------------------------------------------------------------------------
// bts branch

const branchHelp = `Usage: bts branch --seed DIR --out DIR

Branches a seed model into an expert: copies its checkpoint (config.json, weights, tokenizer.json,
generation_config.json) to --out after validating it, and records the seed and its weight hash in
--out/branch.json. Then train the expert on its domain: bts train --model OUT --data ... --out EXPERT

  --seed DIR   the seed model directory
  --out DIR    the new expert directory (must not exist or be empty)
  -h, --help`;

export const branchCommand: CliCommand = {
  name: 'branch',
  summary: 'Copy a seed model into a new expert (BTS phase 1)',
  help: branchHelp,
  async run(argv) {
    const { values } = parseArgs({ args: argv, options: { seed: { type: 'string' }, out: { type: 'string' }, help: { type: 'boolean', short: 'h' } } });
    if (values.help) {
      console.log(branchHelp);
      return 0;
    }
    if (!values.seed || !values.out) throw new ArgumentError('--seed and --out are required');
    const m = await branchModel(values.seed, values.out);
    console.log(`branched ${values.seed} -> ${values.out} (${m.files.length} files, seed sha256 ${m.sha256.slice(0, 16)}...)`);
    return 0;
  },
};

/** Copies a seed checkpoint into a new expert directory (validated; see `bts branch --help`). */
export async function branchModel(seedDir: string, out: string): Promise<{ files: string[]; sha256: string }> {
  const probe = await LlamaModel.load(seedDir, { trainable: false }); // validates config, names, shapes
  probe.dispose();
  if (fs.existsSync(out) && fs.readdirSync(out).length > 0) throw new ArgumentError(`--out ${out} exists and is not empty`);
  fs.mkdirSync(out, { recursive: true });
  const files = fs.readdirSync(seedDir).filter((f) => f === 'config.json' || f === 'tokenizer.json' || f === 'generation_config.json' || f === 'tokenizer_config.json' || /\.safetensors(\.index\.json)?$/.test(f) || f === 'model.safetensors.index.json');
  for (const f of files) await copyFileAtomic(path.join(seedDir, f), path.join(out, f));
  const sha256 = modelWeightsSha256(seedDir);
  fs.writeFileSync(path.join(out, 'branch.json'), JSON.stringify({ format: 'bts-branch', version: 1, seed: path.resolve(seedDir), seedSha256: sha256, date: new Date().toISOString() }, null, 2) + '\n');
  return { files, sha256 };
}

// ---------------------------------------------------------------------------------------------------
// bts stitch

const stitchHelp = `Usage:
  bts stitch --hub DIR --expert [NAME=]DIR... --data DOMAIN=FILE[,FILE]... --out DIR [options]
  bts stitch --from DIR --remove-expert NAME --out DIR [--data ... --steps N]
  bts stitch --from DIR --add-expert NAME=DIR --out DIR --data ... [--train-all] [options]

Trains K stitch layers between a frozen hub (the seed) and frozen experts on a datamix, with
next-token loss on the hub's output (BTS phase 3). The result in --out is stitch.json (naming the
models and their weight hashes) + stitches.safetensors, with loss.svg, train.json, checkpoints/.
With --from, an existing stitched model loses an expert (its slices are dropped; training is
optional: --steps 0 by default) or gains one (new slices initialised identity/zero and trained,
alone or with --train-all all slices).

Model options:
  --hub DIR             the hub (the seed model)
  --expert [NAME=]DIR   an expert (repeatable; NAME defaults to the folder name)
  --k K                 number of stitches (default min(4, layers))
  --pattern P           alternating (ending with E->H, default) or all-eh
  --expert-stream S     projected (default) or unchanged: the experts' stream after an E->H stitch
  --hub-bias X          fixed gate bias towards the hub (hub-preserving start), default 0
  --gate-dropout P      dropout on the gate logits in training (default 0)
  --dtype f32|bf16      in-memory dtype of the frozen models (default: as stored)

Data options:
  --data DOMAIN=FILE[,FILE]  text of one domain (repeatable), e.g. --data code=src.txt
  --mix DOMAIN=W,...         domain weights of the datamix (default equal), e.g.
                             code=0.15,math=0.15,multilingual=0.15,general=0.55 (METHOD.md)
  --held-out F               fraction of each domain's documents held out (default 0.05)

Training options:
  --steps N (default 200; 0 with --remove-expert)  --batch B (16)  --seq-len T (256)  --accum N (1)
  --lr X (1e-3)  --warmup N  --min-lr-ratio R (0.01)  --weight-decay X (0)  --clip X (1)
  --eval-every N  --checkpoint-every N  --seed S (0)  --threads N  --fresh
  -h, --help`;

function parseNamed(flag: string, s: string): [string, string] {
  const i = s.indexOf('=');
  if (i <= 0) throw new ArgumentError(`${flag} expects NAME=VALUE, got '${s}'`);
  return [s.slice(0, i), s.slice(i + 1)];
}

/** Parses `a=0.15,b=0.55` into a record of positive numbers. */
export function parseMix(s: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const part of s.split(',')) {
    const [k, v] = parseNamed('--mix', part.trim());
    const w = Number(v);
    if (!(w > 0) || !Number.isFinite(w)) throw new ArgumentError(`--mix: weight of '${k}' must be a positive number, got '${v}'`);
    out[k] = w;
  }
  return out;
}

export const stitchCommand: CliCommand = {
  name: 'stitch',
  summary: 'Train stitch layers between a hub and experts (BTS phase 3); remove/add experts',
  help: stitchHelp,
  async run(argv) {
    const { values } = parseArgs({
      args: argv,
      options: {
        ...trainingParseOptions,
        hub: { type: 'string' },
        expert: { type: 'string', multiple: true },
        from: { type: 'string' },
        'remove-expert': { type: 'string' },
        'add-expert': { type: 'string' },
        'train-all': { type: 'boolean' },
        mix: { type: 'string' },
        k: { type: 'string' },
        pattern: { type: 'string' },
        'expert-stream': { type: 'string' },
        'hub-bias': { type: 'string' },
        'gate-dropout': { type: 'string' },
        dtype: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    });
    if (values.help) {
      console.log(stitchHelp);
      return 0;
    }
    if (!values.out) throw new ArgumentError('--out is required');
    if (values.threads !== undefined) setThreads(intArg('--threads', values.threads, 1));
    const dtype = values.dtype as 'f32' | 'bf16' | undefined;
    if (dtype !== undefined && dtype !== 'f32' && dtype !== 'bf16') throw new ArgumentError(`--dtype must be f32 or bf16, got '${dtype}'`);
    let model: StitchedModel;
    let defaultSteps = 200;
    if (values.from) {
      const base = await StitchedModel.load(values.from, { dtype });
      if (values['remove-expert'] && values['add-expert']) throw new ArgumentError('give either --remove-expert or --add-expert, not both');
      if (values['remove-expert']) {
        model = base.removeExpert(values['remove-expert']);
        defaultSteps = 0;
      } else if (values['add-expert']) {
        const [name, dir] = parseNamed('--add-expert', values['add-expert']);
        const e = await LlamaModel.load(dir, { trainable: false, dtype });
        model = base.addExpert(e, name, { trainOnlyNew: !values['train-all'] });
      } else throw new ArgumentError('--from needs --remove-expert NAME or --add-expert NAME=DIR');
    } else {
      if (!values.hub || !values.expert?.length) throw new ArgumentError('--hub and at least one --expert are required (or --from DIR)');
      const hub = await LlamaModel.load(values.hub, { trainable: false, dtype });
      const experts: LlamaModel[] = [];
      const names: string[] = [];
      for (const spec of values.expert) {
        const [name, dir] = spec.includes('=') ? parseNamed('--expert', spec) : [path.basename(path.resolve(spec)), spec];
        names.push(name);
        experts.push(await LlamaModel.load(dir, { trainable: false, dtype }));
      }
      const pattern = values.pattern ?? 'alternating';
      if (pattern !== 'alternating' && pattern !== 'all-eh') throw new ArgumentError(`--pattern must be alternating or all-eh, got '${pattern}'`);
      const stream = values['expert-stream'] ?? 'projected';
      if (stream !== 'projected' && stream !== 'unchanged') throw new ArgumentError(`--expert-stream must be projected or unchanged, got '${stream}'`);
      model = StitchedModel.create(hub, experts, {
        K: values.k === undefined ? undefined : intArg('--k', values.k, 1),
        pattern,
        expertStream: stream,
        hubBias: numArg('--hub-bias', values['hub-bias'], 0),
        gateDropout: numArg('--gate-dropout', values['gate-dropout'], 0, 0),
        expertNames: names,
        seed: intArg('--seed', values.seed, 0, 0),
      });
    }
    const steps = intArg('--steps', values.steps, defaultSteps, 0);
    const out = values.out;
    if (steps === 0) {
      await model.save(out);
      console.log(`stitch: ${model.numExperts} experts (${model.expertNames.join(', ')}), ${model.placement.length} stitches, no training -> ${out}`);
      model.disposeAll();
      return 0;
    }
    if (!values.data?.length) throw new ArgumentError('--data DOMAIN=FILE is required for training');
    const tok = model.tokenizer;
    if (!tok) throw new ArgumentError('the hub has no tokenizer.json (needed to read the data)');
    const seqLen = intArg('--seq-len', values['seq-len'], 256);
    const heldOutFraction = numArg('--held-out', values['held-out'], 0.05, 0);
    const train: Record<string, TokenCorpus> = {};
    const heldParts: TokenCorpus[] = [];
    for (const spec of values.data) {
      const [domain, list] = parseNamed('--data', spec);
      const files = list.split(',').filter(Boolean);
      for (const f of files) if (!fs.existsSync(f)) throw new ArgumentError(`--data ${domain}: file not found: ${f}`);
      const corpus = await corpusOf(tok, files, path.join(out, 'tokens-cache'));
      const split = splitCorpus(corpus, { heldOutFraction, seed: 0 });
      train[domain] = split.train;
      if (split.heldOut.tokens.length > 1) heldParts.push(split.heldOut);
      console.error(`data ${domain}: ${split.train.tokens.length} train tokens, ${split.heldOut.tokens.length} held out`);
    }
    const { concatCorpora } = await import('../data/tokens.js');
    const mix = values.mix ? parseMix(values.mix) : undefined;
    if (mix) for (const k of Object.keys(mix)) if (!train[k]) throw new ArgumentError(`--mix names domain '${k}', which has no --data`);
    const hubDir = model.hub.sourceDir!;
    const expertDirs = model.experts.map((e) => e.sourceDir!);
    const names = model.expertNames;
    const { summary } = await runTraining(model, {
      train: mix ? Object.fromEntries(Object.keys(mix).map((k) => [k, train[k]])) : train,
      mixWeights: mix,
      heldOut: heldParts.length ? concatCorpora(heldParts) : null,
      out,
      batchSize: intArg('--batch', values.batch, 16),
      seqLen,
      steps,
      gradAccumSteps: intArg('--accum', values.accum, 1),
      lr: numArg('--lr', values.lr, 1e-3, 0),
      warmupSteps: values.warmup === undefined ? undefined : intArg('--warmup', values.warmup, 0, 0),
      minLrRatio: numArg('--min-lr-ratio', values['min-lr-ratio'], 0.01, 0),
      weightDecay: numArg('--weight-decay', values['weight-decay'], 0, 0),
      maxGradNorm: numArg('--clip', values.clip, 1, 0),
      precision: values.precision === undefined ? undefined : (values.precision as 'f32' | 'bf16'),
      evalEvery: intArg('--eval-every', values['eval-every'], Math.max(1, Math.floor(steps / 10))),
      checkpointEvery: intArg('--checkpoint-every', values['checkpoint-every'], Math.max(1, Math.floor(steps / 10))),
      seed: intArg('--seed', values.seed, 0, 0),
      fresh: Boolean(values.fresh),
      label: 'stitch',
      title: `Stitch training loss (hub + ${names.length} experts)`,
      saveFinal: async (m, dir) => (m as StitchedModel).save(dir),
      loadCheckpointModel: async (dir) => {
        // A checkpoint holds stitch.json + stitches.safetensors whose model paths are relative to it.
        const m = await StitchedModel.load(dir, { dtype });
        if (path.resolve(m.hub.sourceDir!) !== path.resolve(hubDir) || m.experts.some((e, i) => path.resolve(e.sourceDir!) !== path.resolve(expertDirs[i])))
          throw new ArgumentError(`the checkpoint in ${dir} was made with other models; pass --fresh to start over`);
        return m;
      },
    });
    console.log(`stitch: ${summary.steps} steps, final loss ${summary.finalLoss.toFixed(4)}${summary.evalLoss !== null ? `, held-out ${summary.evalLoss.toFixed(4)}` : ''}, ${Math.round(summary.tokensPerSecond)} tokens/s -> ${out}`);
    return 0;
  },
};

// ---------------------------------------------------------------------------------------------------
// bts gates

const gatesHelp = `Usage: bts gates --model DIR (--text TEXT | --file FILE) --out FILE.svg [--max-tokens N]

Renders the gate values of a stitched model over a text (the paper's Figure 3): for every stitch,
token by token, how much the hub draws on each model (E->H: the softmax weight, averaged over the
hidden dims; H->E: each expert's sigmoid gate). Also prints them as a table with --print.

  --model DIR       stitched model directory
  --text TEXT       the text (or --file FILE)
  --out FILE.svg    where to write the image (default gates.svg)
  --max-tokens N    use the first N tokens (default 128)
  --print           also print per-token values
  -h, --help`;

export const gatesCommand: CliCommand = {
  name: 'gates',
  summary: 'Render the gate map of a stitched model over a text (Figure 3)',
  help: gatesHelp,
  async run(argv) {
    const { values } = parseArgs({ args: argv, options: { model: { type: 'string' }, text: { type: 'string' }, file: { type: 'string' }, out: { type: 'string' }, 'max-tokens': { type: 'string' }, print: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } } });
    if (values.help) {
      console.log(gatesHelp);
      return 0;
    }
    if (!values.model) throw new ArgumentError('--model is required');
    const text = values.text ?? (values.file ? fs.readFileSync(values.file, 'utf8') : undefined);
    if (text === undefined || text === '') throw new ArgumentError('give --text TEXT or --file FILE');
    const model = await StitchedModel.load(values.model);
    try {
      const out = values.out ?? 'gates.svg';
      const { svg, table } = await gateMap(model, text, intArg('--max-tokens', values['max-tokens'], 128));
      writeSvg(out, svg);
      if (values.print) console.log(table);
      console.log(`gates: ${model.placement.length} stitches x ${model.numExperts + 1} models -> ${out}`);
      return 0;
    } finally {
      model.disposeAll();
    }
  },
};

/** The gate map of `text` as an SVG heatmap (rows: stitch x model, columns: tokens) and a text table. */
export async function gateMap(model: StitchedModel, text: string, maxTokens = 128): Promise<{ svg: string; table: string; values: Float32Array; tokens: string[] }> {
  const tok = model.tokenizer;
  if (!tok) throw new ArgumentError('the stitched model has no tokenizer');
  let ids = tok.encode(text);
  if (model.bosTokenId !== null) ids = Int32Array.from([model.bosTokenId, ...ids]);
  ids = ids.subarray(0, Math.min(ids.length, maxTokens, model.maxPositions));
  const g = await model.gates(ids);
  const T = ids.length;
  const M = model.numExperts + 1;
  const names = ['hub', ...model.expertNames];
  const rows: string[] = [];
  const vals: number[][] = [];
  model.placement.forEach((s, k) => {
    for (let m = s.type === 'eh' ? 0 : 1; m < M; m++) {
      rows.push(`#${k} ${s.type === 'eh' ? 'E->H' : 'H->E'} ${names[m]}`);
      vals.push(Array.from({ length: T }, (_, t) => g[(k * T + t) * M + m]));
    }
  });
  const pieces = Array.from(ids, (id) => new TextDecoder('utf-8', { fatal: false }).decode(tok.tokenBytes(id)));
  const svg = heatmap({ title: 'Stitch gates per token: how much each stitch draws on each model', rows, columns: pieces, values: vals, caption: `Rows: stitch #k (${model.placement.map((p, k) => `#${k} after block ${p.afterBlock}`).join(', ')}), type, model. E->H: softmax weight of each model in the hub (mean over hidden dims). H->E: sigmoid gate of the hub into each expert.` });
  const table = [['token', ...rows.map((_, i) => `r${i}`)].join('\t'), ...pieces.map((p, t) => [JSON.stringify(p), ...vals.map((r) => r[t].toFixed(3))].join('\t'))].join('\n');
  return { svg, table, values: g, tokens: pieces };
}

// ---------------------------------------------------------------------------------------------------
// bts merge

const mergeHelp = `Usage: bts merge --model DIR --model DIR... --out DIR [--weights W1,W2,...] [--dtype f32|bf16]

Model soup: the element-wise (weighted) mean of the weights of models of one architecture (e.g. the
seed and its experts). Writes a model directory with the first model's tokenizer.

  --model DIR      a model (repeatable, at least two)
  --weights W,...  one non-negative weight per model (default equal)
  --dtype D        stored dtype of the result (default f32)
  -h, --help`;

export const mergeCommand: CliCommand = {
  name: 'merge',
  summary: 'Model soup: average the weights of several models',
  help: mergeHelp,
  async run(argv) {
    const { values } = parseArgs({ args: argv, options: { model: { type: 'string', multiple: true }, out: { type: 'string' }, weights: { type: 'string' }, dtype: { type: 'string' }, help: { type: 'boolean', short: 'h' } } });
    if (values.help) {
      console.log(mergeHelp);
      return 0;
    }
    if (!values.out) throw new ArgumentError('--out is required');
    if (!values.model || values.model.length < 2) throw new ArgumentError('give at least two --model');
    const weights = values.weights?.split(',').map((w) => numArg('--weights', w, 1, 0));
    const dtype = (values.dtype ?? 'f32') as 'f32' | 'bf16';
    if (dtype !== 'f32' && dtype !== 'bf16') throw new ArgumentError(`--dtype must be f32 or bf16, got '${dtype}'`);
    const models: LlamaModel[] = [];
    try {
      for (const d of values.model) models.push(await LlamaModel.load(d, { trainable: false }));
      const soup = modelSoup(models, weights);
      await soup.save(values.out, { dtype });
      soup.dispose();
      console.log(`merge: soup of ${models.length} models -> ${values.out}`);
      return 0;
    } finally {
      for (const m of models) m.dispose();
    }
  },
};
