/**
 * npm run reproduce [-- --out DIR] [-- --data DIR] [-- --seed S]
 *
 * The reproducible table of issue 5: the whole BTS pipeline at the 'reproduce' scale of
 * lib/pipeline/bts.ts (an 8.6M-parameter seed, the full Debian + npm corpora of `bts data --preset
 * full`, every baseline and ablation: seed, experts, model soup, BTM ensemble, dense, BTS K=4, K=1,
 * all E->H, without the math expert with and without retraining), sized for about two hours on 2
 * cores. Every phase checkpoints; rerunning the command resumes where it stopped.
 * The working folder (models, checkpoints) defaults to ~/.cache/branch-train-stitch/reproduce; the
 * results (results.json, results.md, figures/*.svg) are copied to bench/results/reproduce/.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { runPipeline } from '../lib/pipeline/bts.js';
import { root } from './common.js';

function arg(flag: string): string | undefined {
  const i = process.argv.indexOf(flag);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

async function main(): Promise<void> {
  const out = path.resolve(arg('--out') ?? path.join(process.env.BTS_CACHE_DIR ?? path.join(os.homedir(), '.cache', 'branch-train-stitch'), 'reproduce'));
  const t0 = performance.now();
  const r = await runPipeline({ out, scale: 'reproduce', corpusDir: arg('--data'), seed: Number(arg('--seed') ?? 0) });
  const dest = path.join(root, 'bench', 'results', 'reproduce');
  fs.mkdirSync(path.join(dest, 'figures'), { recursive: true });
  for (const f of ['results.json', 'results.md']) fs.copyFileSync(path.join(out, f), path.join(dest, f));
  for (const f of fs.readdirSync(path.join(out, 'figures'))) fs.copyFileSync(path.join(out, 'figures', f), path.join(dest, 'figures', f));
  console.log(fs.readFileSync(path.join(out, 'results.md'), 'utf8'));
  for (const [claim, ok] of Object.entries(r.checks)) console.log(`${ok ? 'held' : 'DID NOT HOLD'}: ${claim}`);
  console.log(`reproduce: ${((performance.now() - t0) / 60000).toFixed(1)} min this run; results copied to ${dest}`);
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
