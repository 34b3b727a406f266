/**
 * `bts pretrain` (a new seed model from random init), `bts train` (continue pretraining a model
 * directory: how experts are trained) and `bts eval` (held-out loss and perplexity). All three read
 * UTF-8 text files, tokenize them (cached in <out>/tokens-cache), and for training pack them into
 * fixed-length sequences with a held-out split by document. Training resumes from <out>/checkpoints
 * when the same command is run again (pass --fresh to start over).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { ArgumentError } from '../errors.js';
import { loadLlamaConfig } from '../formats/hf-config.js';
import { encodeFiles, splitCorpus, type TokenCorpus } from '../data/tokens.js';
import { LlamaModel } from '../model/llama.js';
import { llamaPreset, PRESET_NAMES } from '../model/presets.js';
import { evaluateTokens } from '../infer/evaluate.js';
import { loadTokenizerFile, trainBpe, type BpeTokenizer } from '../tokenizer/bpe.js';
import { setThreads } from '../runtime.js';
import { runTraining } from '../train/run.js';
import type { CliCommand } from './command.js';
import { BOS_TOKEN, EOS_TOKEN, intArg, numArg, readTexts } from './tokenizer.js';
import { openDecoder } from './generate.js';

const trainingOptionsHelp = `Training options:
  --steps N            optimizer steps (default 200)
  --batch B            sequences per micro-batch (default 16)
  --seq-len T          tokens per sequence (default 256)
  --accum N            micro-batches per optimizer step (default 1)
  --lr X               peak learning rate (default 1e-3 for pretrain, 3e-4 for train)
  --warmup N           warmup steps (default steps/10, at most 100)
  --min-lr-ratio R     final LR / peak LR of the cosine decay (default 0.1)
  --weight-decay X     AdamW decoupled weight decay on matrices (default 0.1)
  --clip X             global gradient-norm clip, 0 = off (default 1)
  --precision P        f32 or bf16 (bf16 mixed precision; default f32)
  --held-out F         fraction of documents held out for evaluation (default 0.05)
  --eval-every N       evaluate the held-out loss every N steps (default steps/10)
  --checkpoint-every N write a checkpoint every N steps (default steps/10)
  --seed S             seed of the data order (and init, for pretrain) (default 0)
  --threads N          compute threads (default: all cores)
  --fresh              ignore existing checkpoints in --out and start over
  -h, --help`;

const pretrainHelp = `Usage: bts pretrain --data FILE... --out DIR [--config NAME|config.json] [--tokenizer FILE] [options]

Pretrains a new Llama model from random initialisation on text files. Without --tokenizer a
byte-level BPE tokenizer (--vocab-size) is trained on the data first. The result in --out is a
Hugging Face model directory (config.json, model.safetensors, tokenizer.json), plus loss.svg,
train.json and checkpoints/ (rerun the same command to resume).

Model options:
  --config NAME|FILE   ${PRESET_NAMES.join(', ')} (default small), or a config.json path
  --tokenizer FILE     tokenizer.json to use (default: train one on the data)
  --vocab-size N       vocabulary of the trained tokenizer (default 4096)
  --data FILE          training text (repeatable; positional arguments work too)

${trainingOptionsHelp}`;

const trainHelp = `Usage: bts train --model DIR --data FILE... --out DIR [options]

Continues pretraining a model directory on text files, all weights trainable (how BTS trains an
expert from a branched seed). The result in --out is a model directory with loss.svg, train.json
and checkpoints/ (rerun the same command to resume).

  --model DIR          the model to start from (config.json, model.safetensors, tokenizer.json)
  --data FILE          training text (repeatable; positional arguments work too)

${trainingOptionsHelp}`;

const evalHelp = `Usage: bts eval --model DIR --data FILE... [--seq-len T] [--batch B] [--json]

Mean next-token loss (nats/token), perplexity and bits per byte of a model (or a stitched model
directory) on text files, every token predicted once (non-overlapping windows of T).

  --model DIR      model directory or stitched model directory
  --data FILE      text to evaluate (repeatable; positional arguments work too)
  --seq-len T      window length (default 256)
  --batch B        windows per batch (default 8)
  --max-windows N  evaluate at most N windows
  --threads N      compute threads
  --json           print JSON
  -h, --help`;

/** The flags shared by every training command (pretrain, train, stitch). */
export const trainingParseOptions = {
  data: { type: 'string', multiple: true },
  out: { type: 'string' },
  steps: { type: 'string' },
  batch: { type: 'string' },
  'seq-len': { type: 'string' },
  accum: { type: 'string' },
  lr: { type: 'string' },
  warmup: { type: 'string' },
  'min-lr-ratio': { type: 'string' },
  'weight-decay': { type: 'string' },
  clip: { type: 'string' },
  precision: { type: 'string' },
  'held-out': { type: 'string' },
  'eval-every': { type: 'string' },
  'checkpoint-every': { type: 'string' },
  seed: { type: 'string' },
  threads: { type: 'string' },
  fresh: { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
} as const;

type Values = Record<string, string | boolean | string[] | undefined>;

function dataFiles(values: Values, positionals: string[]): string[] {
  const files = [...((values.data as string[] | undefined) ?? []), ...positionals];
  if (files.length === 0) throw new ArgumentError('no training text given (--data FILE)');
  for (const f of files) {
    if (!fs.existsSync(f)) throw new ArgumentError(`data file not found: ${f}`);
    if (!fs.statSync(f).isFile()) throw new ArgumentError(`not a file: ${f}`);
  }
  return files;
}

/** Tokenizes files (with a cache in `cacheDir`), EOS after every file. */
export async function corpusOf(tokenizer: BpeTokenizer, files: string[], cacheDir?: string): Promise<TokenCorpus> {
  return encodeFiles(tokenizer, files, { eosId: tokenizer.eosId, cacheDir, invalidUtf8: 'replace' });
}

async function train(kind: 'pretrain' | 'train', argv: string[]): Promise<number> {
  const extra: Record<string, { type: 'string' }> = kind === 'pretrain' ? { config: { type: 'string' }, tokenizer: { type: 'string' }, 'vocab-size': { type: 'string' } } : { model: { type: 'string' } };
  const { values, positionals } = parseArgs({ args: argv, allowPositionals: true, options: { ...trainingParseOptions, ...extra } });
  const v = values as Values;
  if (v.help) {
    console.log(kind === 'pretrain' ? pretrainHelp : trainHelp);
    return 0;
  }
  if (!v.out) throw new ArgumentError('--out is required');
  const out = v.out as string;
  const files = dataFiles(v, positionals);
  if (v.threads !== undefined) setThreads(intArg('--threads', v.threads as string, 1));
  const precision = (v.precision as string | undefined) ?? 'f32';
  if (precision !== 'f32' && precision !== 'bf16') throw new ArgumentError(`--precision must be f32 or bf16, got '${precision}'`);
  const steps = intArg('--steps', v.steps as string, 200);
  const seqLen = intArg('--seq-len', v['seq-len'] as string, 256);
  const seed = intArg('--seed', v.seed as string, 0, 0);
  let model: LlamaModel;
  let tokenizer: BpeTokenizer;
  if (kind === 'pretrain') {
    if (v.tokenizer) tokenizer = loadTokenizerFile(v.tokenizer as string);
    else {
      const t0 = performance.now();
      tokenizer = await trainBpe(readTexts(files, 50e6), { vocabSize: intArg('--vocab-size', v['vocab-size'] as string, 4096), specialTokens: [BOS_TOKEN, EOS_TOKEN], bosToken: BOS_TOKEN, eosToken: EOS_TOKEN });
      console.error(`tokenizer: trained ${tokenizer.vocabSize} ids in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    }
    const cfgArg = (v.config as string | undefined) ?? 'small';
    const config = PRESET_NAMES.includes(cfgArg)
      ? llamaPreset(cfgArg, { vocabSize: tokenizer.vocabSize, bosTokenId: tokenizer.bosId, eosTokenId: tokenizer.eosId, maxPositionEmbeddings: Math.max(seqLen, 512) })
      : loadLlamaConfig(cfgArg);
    if (config.vocabSize < tokenizer.vocabSize) throw new ArgumentError(`the config's vocab_size ${config.vocabSize} is smaller than the tokenizer's ${tokenizer.vocabSize}`);
    model = LlamaModel.random(config, { seed, tokenizer });
  } else {
    if (!v.model) throw new ArgumentError('--model is required');
    model = await LlamaModel.load(v.model as string, { trainable: true });
    if (!model.tokenizer) throw new ArgumentError(`${v.model}: no tokenizer.json (needed to read the text)`);
    tokenizer = model.tokenizer;
  }
  const corpus = await corpusOf(tokenizer, files, path.join(out, 'tokens-cache'));
  const split = splitCorpus(corpus, { heldOutFraction: numArg('--held-out', v['held-out'] as string, 0.05, 0), seed });
  console.error(`data: ${corpus.tokens.length} tokens in ${corpus.docStarts.length} documents; ${split.train.tokens.length} train, ${split.heldOut.tokens.length} held out`);
  const { summary } = await runTraining(model, {
    train: split.train,
    heldOut: split.heldOut,
    out,
    batchSize: intArg('--batch', v.batch as string, 16),
    seqLen,
    steps,
    gradAccumSteps: intArg('--accum', v.accum as string, 1),
    lr: numArg('--lr', v.lr as string, kind === 'pretrain' ? 1e-3 : 3e-4, 0),
    warmupSteps: v.warmup === undefined ? undefined : intArg('--warmup', v.warmup as string, 0, 0),
    minLrRatio: numArg('--min-lr-ratio', v['min-lr-ratio'] as string, 0.1, 0),
    weightDecay: numArg('--weight-decay', v['weight-decay'] as string, 0.1, 0),
    maxGradNorm: numArg('--clip', v.clip as string, 1, 0),
    precision,
    evalEvery: intArg('--eval-every', v['eval-every'] as string, Math.max(1, Math.floor(steps / 10))),
    checkpointEvery: intArg('--checkpoint-every', v['checkpoint-every'] as string, Math.max(1, Math.floor(steps / 10))),
    seed,
    fresh: Boolean(v.fresh),
    label: kind,
    title: `${kind === 'pretrain' ? 'Pretraining' : 'Continued pretraining'} loss (${path.basename(path.resolve(out))})`,
    saveFinal: async (m, dir) => (m as LlamaModel).save(dir, { dtype: 'f32' }),
    loadCheckpointModel: async (dir) => {
      const m = await LlamaModel.load(dir, { trainable: true });
      m.tokenizer ??= tokenizer;
      return m;
    },
  });
  console.log(`${kind}: ${summary.steps} steps, ${summary.tokens} tokens, final loss ${summary.finalLoss.toFixed(4)}${summary.evalLoss !== null ? `, held-out ${summary.evalLoss.toFixed(4)}` : ''}, ${Math.round(summary.tokensPerSecond)} tokens/s -> ${out}`);
  return 0;
}

export const pretrainCommand: CliCommand = { name: 'pretrain', summary: 'Pretrain a new Llama model on text files', help: pretrainHelp, run: (argv) => train('pretrain', argv) };
export const trainCommand: CliCommand = { name: 'train', summary: 'Continue pretraining a model on text files (train an expert)', help: trainHelp, run: (argv) => train('train', argv) };

export const evalCommand: CliCommand = {
  name: 'eval',
  summary: 'Held-out loss and perplexity of a model on text files',
  help: evalHelp,
  async run(argv) {
    const { values, positionals } = parseArgs({
      args: argv,
      allowPositionals: true,
      options: { model: { type: 'string' }, data: { type: 'string', multiple: true }, 'seq-len': { type: 'string' }, batch: { type: 'string' }, 'max-windows': { type: 'string' }, threads: { type: 'string' }, json: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } },
    });
    if (values.help) {
      console.log(evalHelp);
      return 0;
    }
    if (!values.model) throw new ArgumentError('--model is required');
    const files = dataFiles(values as Values, positionals);
    if (values.threads !== undefined) setThreads(intArg('--threads', values.threads, 1));
    const model = await openDecoder(values.model);
    try {
      if (!model.tokenizer) throw new ArgumentError(`${values.model}: no tokenizer.json`);
      const corpus = await corpusOf(model.tokenizer, files);
      const bytes = files.reduce((a, f) => a + fs.statSync(f).size, 0);
      const r = await evaluateTokens(model as unknown as Parameters<typeof evaluateTokens>[0], corpus.tokens, {
        seqLen: intArg('--seq-len', values['seq-len'], 256),
        batchSize: intArg('--batch', values.batch, 8),
        maxWindows: values['max-windows'] === undefined ? undefined : intArg('--max-windows', values['max-windows'], 1),
        textBytes: values['max-windows'] === undefined ? bytes : undefined,
      });
      if (values.json) console.log(JSON.stringify({ model: values.model, files, ...r }));
      else console.log(`loss ${r.loss.toFixed(4)} nats/token, perplexity ${r.perplexity.toFixed(2)}${r.bitsPerByte !== null ? `, ${r.bitsPerByte.toFixed(3)} bits/byte` : ''} over ${r.tokens} tokens (${r.seconds.toFixed(1)} s)`);
      return 0;
    } finally {
      model.dispose();
    }
  },
};


