/**
 * `bts tokenizer train`: trains a byte-level BPE tokenizer (Llama 3 pre-tokenizer) on text files and
 * writes a Hugging Face tokenizer.json. Special tokens get ids after the merges: <|begin_of_text|>
 * (BOS), <|end_of_text|> (EOS, also the document separator in training data).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { ArgumentError, FormatError } from '../errors.js';
import { trainBpe } from '../tokenizer/bpe.js';
import type { CliCommand } from './command.js';

/** Default special tokens of tokenizers trained by this package. */
export const BOS_TOKEN = '<|begin_of_text|>';
export const EOS_TOKEN = '<|end_of_text|>';

const help = `Usage: bts tokenizer train --out FILE|DIR [--vocab-size N] [--max-mb M] FILE...

Trains a byte-level BPE tokenizer on the given UTF-8 text files and writes a Hugging Face
tokenizer.json (to FILE, or DIR/tokenizer.json).

Options:
  --out PATH         where to write (required)
  --vocab-size N     total vocabulary incl. 256 bytes and 2 special tokens (default 4096)
  --min-frequency N  merge only pairs seen at least N times (default 2)
  --max-mb M         read at most M MB of text in total, spread over the files (default: all)
  -h, --help

Special tokens: ${BOS_TOKEN} (BOS) and ${EOS_TOKEN} (EOS).`;

/** Reads up to `maxBytes` of text from the files, a fair share from each. */
export function readTexts(files: string[], maxBytes = Infinity): string[] {
  if (files.length === 0) throw new ArgumentError('no input files given');
  const share = Math.floor(maxBytes / files.length);
  return files.map((f) => {
    if (!fs.existsSync(f)) throw new ArgumentError(`input file not found: ${f}`);
    const st = fs.statSync(f);
    if (!st.isFile()) throw new ArgumentError(`not a file: ${f}`);
    const buf = fs.readFileSync(f);
    const text = new TextDecoder('utf-8', { fatal: false }).decode(Number.isFinite(share) && buf.length > share ? buf.subarray(0, share) : buf);
    if (text.includes('\uFFFD') && !buf.includes(Buffer.from('\uFFFD'))) {
      // A cut in the middle of a character is fine (dropped below); invalid UTF-8 elsewhere is not.
      const trimmed = text.replace(/\uFFFD+$/u, '');
      if (trimmed.includes('\uFFFD')) throw new FormatError(`${f}: not valid UTF-8 text`);
      return trimmed;
    }
    return text;
  });
}

export const tokenizerCommand: CliCommand = {
  name: 'tokenizer',
  summary: 'Train a byte-level BPE tokenizer (bts tokenizer train)',
  help,
  async run(argv) {
    const [sub, ...rest] = argv;
    if (!sub || sub === '-h' || sub === '--help') {
      console.log(help);
      return sub ? 0 : 2;
    }
    if (sub !== 'train') throw new ArgumentError(`unknown subcommand 'tokenizer ${sub}' (expected 'tokenizer train')`);
    const { values, positionals } = parseArgs({
      args: rest,
      allowPositionals: true,
      options: { out: { type: 'string' }, 'vocab-size': { type: 'string' }, 'min-frequency': { type: 'string' }, 'max-mb': { type: 'string' }, help: { type: 'boolean', short: 'h' } },
    });
    if (values.help) {
      console.log(help);
      return 0;
    }
    if (!values.out) throw new ArgumentError('--out is required');
    const vocabSize = intArg('--vocab-size', values['vocab-size'], 4096);
    const minFrequency = intArg('--min-frequency', values['min-frequency'], 2);
    const maxMb = values['max-mb'] === undefined ? Infinity : Number(values['max-mb']);
    if (!(maxMb > 0)) throw new ArgumentError(`--max-mb must be a positive number, got ${values['max-mb']}`);
    const texts = readTexts(positionals, maxMb * 1e6);
    const bytes = texts.reduce((a, t) => a + Buffer.byteLength(t), 0);
    const t0 = performance.now();
    let last = -1;
    const tok = await trainBpe(texts, {
      vocabSize,
      minFrequency,
      specialTokens: [BOS_TOKEN, EOS_TOKEN],
      bosToken: BOS_TOKEN,
      eosToken: EOS_TOKEN,
      onProgress: (f) => {
        const pct = Math.floor(f * 100);
        if (process.stderr.isTTY && pct !== last) process.stderr.write(`\rtraining BPE: ${pct}%`);
        last = pct;
      },
    });
    if (process.stderr.isTTY) process.stderr.write('\n');
    const out = values.out.endsWith('.json') ? values.out : path.join(values.out, 'tokenizer.json');
    fs.mkdirSync(path.dirname(out), { recursive: true });
    tok.save(out);
    const secs = (performance.now() - t0) / 1000;
    console.log(`tokenizer: ${tok.vocabSize} ids (${tok.numMerges} merges) from ${(bytes / 1e6).toFixed(1)} MB in ${secs.toFixed(1)} s -> ${out}`);
    return 0;
  },
};

/** Parses an integer flag. */
export function intArg(name: string, v: string | undefined, dflt: number, min = 1): number {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < min) throw new ArgumentError(`${name} must be an integer >= ${min}, got '${v}'`);
  return n;
}

/** Parses a number flag. */
export function numArg(name: string, v: string | undefined, dflt: number, min = -Infinity): number {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isFinite(n) || n < min) throw new ArgumentError(`${name} must be a number >= ${min}, got '${v}'`);
  return n;
}
