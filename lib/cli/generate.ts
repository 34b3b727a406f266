/**
 * `bts generate`: samples text from a model directory, streaming it to stdout as it is generated.
 * Ctrl-C stops generation cleanly (AbortSignal), keeping what was printed.
 */
import { parseArgs } from 'node:util';
import { ArgumentError } from '../errors.js';
import { LlamaModel } from '../model/llama.js';
import { streamGenerateBatch } from '../infer/generate.js';
import type { CausalDecoder } from '../infer/generate.js';
import type { CliCommand } from './command.js';
import { intArg, numArg } from './tokenizer.js';

const help = `Usage: bts generate --model DIR [--prompt TEXT]... [options]

Generates text with a KV cache and prints it as it comes. Several --prompt flags are generated
together in one batch (printed one after another at the end).

Options:
  --model DIR          model directory (config.json, model.safetensors, tokenizer.json), or a
                       stitched model directory (stitch.json)
  --prompt TEXT        prompt text (repeatable; default: the BOS token only)
  --ids I,J,...        a prompt given as token ids instead of text (repeatable)
  --max-tokens N       tokens to generate per prompt (default 128)
  --temperature T      0 = greedy (default 0.8)
  --top-k K            keep the K most likely tokens, 0 = off (default 40)
  --top-p P            nucleus sampling mass, 1 = off (default 0.95)
  --seed S             sampling seed (default 0)
  --stop TEXT          stop at this text (repeatable)
  --dtype f32|bf16     in-memory weight type (default: as stored)
  --stats              print prefill/decode speed to stderr at the end
  -h, --help`;

/** Opens a model directory for inference: a Llama model, or (when stitch.json exists) a stitched model. */
export type DecoderOpener = (dir: string, dtype?: 'f32' | 'bf16') => Promise<CausalDecoder & { dispose(): void }>;

let openStitched: DecoderOpener | null = null;

/** Lets the stitch module register how to open stitched model directories (avoids an import cycle). */
export function registerStitchedOpener(open: DecoderOpener): void {
  openStitched = open;
}

/** Opens `dir` as a Llama model or a stitched model. */
export async function openDecoder(dir: string, dtype?: 'f32' | 'bf16'): Promise<CausalDecoder & { dispose(): void }> {
  const fs = await import('node:fs');
  const path = await import('node:path');
  if (!fs.existsSync(dir)) throw new ArgumentError(`model directory not found: ${dir}`);
  if (fs.existsSync(path.join(dir, 'stitch.json'))) {
    if (!openStitched) throw new ArgumentError(`${dir} is a stitched model, but stitched models are not available in this build`);
    return openStitched(dir, dtype);
  }
  return LlamaModel.load(dir, { trainable: false, dtype });
}

export const generateCommand: CliCommand = {
  name: 'generate',
  summary: 'Generate text from a model (streaming)',
  help,
  async run(argv) {
    const { values } = parseArgs({
      args: argv,
      options: {
        model: { type: 'string' },
        prompt: { type: 'string', multiple: true },
        ids: { type: 'string', multiple: true },
        'max-tokens': { type: 'string' },
        temperature: { type: 'string' },
        'top-k': { type: 'string' },
        'top-p': { type: 'string' },
        seed: { type: 'string' },
        stop: { type: 'string', multiple: true },
        dtype: { type: 'string' },
        stats: { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
      },
    });
    if (values.help) {
      console.log(help);
      return 0;
    }
    if (!values.model) throw new ArgumentError('--model is required');
    if (values.dtype !== undefined && values.dtype !== 'f32' && values.dtype !== 'bf16') throw new ArgumentError(`--dtype must be f32 or bf16, got '${values.dtype}'`);
    const model = await openDecoder(values.model, values.dtype as 'f32' | 'bf16' | undefined);
    try {
      const idPrompts = (values.ids ?? []).map((s) =>
        s.split(',').map((x) => {
          const n = Number(x.trim());
          if (!Number.isSafeInteger(n)) throw new ArgumentError(`--ids: '${x}' is not an integer token id`);
          return n;
        }),
      );
      const given: (string | number[])[] = [...(values.prompt ?? []), ...idPrompts];
      const prompts: (string | number[])[] = given.length ? given : [model.bosTokenId !== null ? [model.bosTokenId] : model.tokenizer?.bosId != null ? [model.tokenizer.bosId] : [0]];
      const ac = new AbortController();
      const onSigint = (): void => ac.abort();
      process.once('SIGINT', onSigint);
      const single = prompts.length === 1;
      if (single && typeof prompts[0] === 'string') process.stdout.write(prompts[0]);
      const it = streamGenerateBatch(model, prompts, {
        maxNewTokens: intArg('--max-tokens', values['max-tokens'], 128, 0),
        temperature: numArg('--temperature', values.temperature, 0.8, 0),
        topK: intArg('--top-k', values['top-k'], 40, 0),
        topP: numArg('--top-p', values['top-p'], 0.95, 0),
        seed: intArg('--seed', values.seed, 0, 0),
        stopStrings: values.stop,
        signal: ac.signal,
      });
      let r: IteratorResult<{ text: string }, { text: string; tokensPerSecond: number; prefillSeconds: number; decodeSeconds: number; tokens: number[] }[]>;
      try {
        while (!(r = await it.next()).done) if (single) process.stdout.write(r.value.text);
      } catch (e) {
        if (ac.signal.aborted) {
          process.stdout.write('\n');
          return 130;
        }
        throw e;
      } finally {
        process.removeListener('SIGINT', onSigint);
      }
      const results = r.value;
      if (single) process.stdout.write('\n');
      else results.forEach((res, i) => console.log(`--- prompt ${i}: ${JSON.stringify(prompts[i])}\n${prompts[i]}${res.text}`));
      if (values.stats) {
        const n = results.reduce((a, x) => a + x.tokens.length, 0);
        console.error(`generated ${n} tokens; prefill ${results[0].prefillSeconds.toFixed(3)} s, decode ${results[0].tokensPerSecond.toFixed(1)} tokens/s`);
      }
      return 0;
    } finally {
      model.dispose();
    }
  },
};
