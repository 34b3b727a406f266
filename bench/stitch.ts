/**
 * npm run bench:stitch [-- --config a] [-- --threads 2] [-- --repeat 3] [-- --steps 4] [-- --quick] [-- --no-torch]
 *
 * The stitched model (hub + 3 experts, all frozen; K=2 alternating stitches: after blocks 3 and 6 at
 * config (a)) beside PyTorch on the same machine and threads (bench/torch/stitch_bench.py: frozen
 * models under no_grad before the first stitch, stitch parameters the only leaves):
 * - stitch training step: tokens/s of forward + backward (input gradients only through the frozen
 *   blocks, weight gradients only for the stitches) + AdamW over the stitch parameters, B=16, T=256;
 *   target >= 2x PyTorch;
 * - batch-1 decode of the stitched model (one KV cache per model, 128 tokens after a 16-token prompt),
 *   beside PyTorch's and beside our own plain seed decode: target stitched time per token <=
 *   1.1 * (n+1) * seed time per token.
 */
import { setThreads, info } from '../lib/runtime.js';
import { LlamaModel } from '../lib/model/llama.js';
import { StitchedModel } from '../lib/stitch/model.js';
import { adamwStepAsync } from '../lib/ops/adamw.js';
import { argmax } from '../lib/infer/sampling.js';
import type { CausalDecoder } from '../lib/infer/generate.js';
import { runTorch, torchAvailable, type BenchConfig } from './torch.js';
import { llamaConfigOf, median, parseBenchArgs, printTable, randomBatch, randomTokens, writeResults, type ResultRow } from './common.js';

const args = parseBenchArgs(process.argv.slice(2), { configs: 'a', threads: '2', repeat: 3, steps: 4 });
const N_EXPERTS = 3;
const K = 2;
const PROMPT = 16;
const NEW = 128;

function members(c: BenchConfig): { hub: LlamaModel; experts: LlamaModel[] } {
  const cfg = llamaConfigOf(c);
  return { hub: LlamaModel.random(cfg, { seed: 1 }), experts: Array.from({ length: N_EXPERTS }, (_, i) => LlamaModel.random(cfg, { seed: 2 + i })) };
}

async function trainTps(model: StitchedModel, c: BenchConfig, steps: number): Promise<number> {
  const m = new Float32Array(model.params.length);
  const v = new Float32Array(model.params.length);
  const times: number[] = [];
  for (let s = 0; s <= steps; s++) {
    const { inputs, targets } = randomBatch(c, 50 + s);
    const t0 = performance.now();
    model.zeroGrad();
    await model.forwardBackward(inputs, targets, c.B, c.T, 1 / (c.B * c.T), s);
    await adamwStepAsync({ params: model.params, grads: model.grads, m, v, lr: 1e-3, step: s + 1, maxGradNorm: 1 });
    if (s > 0) times.push((performance.now() - t0) / 1000);
  }
  return (c.B * c.T) / median(times);
}

async function decodeTps(model: CausalDecoder, V: number, reps: number): Promise<number> {
  const cache = model.createCache(1, PROMPT + NEW + 1);
  const out = new Float32Array(V);
  const times: number[] = [];
  try {
    for (let r = 0; r <= reps; r++) {
      cache.reset(0);
      await model.prefill(cache, 0, randomTokens(PROMPT, V, r), out);
      const tok = new Int32Array([argmax(out)]);
      const slot = new Int32Array([0]);
      const t0 = performance.now();
      for (let s = 0; s < NEW; s++) {
        await model.decode(cache, slot, tok, out);
        tok[0] = argmax(out);
      }
      if (r > 0) times.push((performance.now() - t0) / 1000);
    }
  } finally {
    cache.dispose();
  }
  return NEW / median(times);
}

async function main(): Promise<void> {
  const torch = args.noTorch ? { ok: false, why: '--no-torch' } : await torchAvailable();
  if (!torch.ok) console.error(`bench:stitch: PyTorch anchor unavailable (${torch.why}); printing our figures only`);
  const rows: ResultRow[] = [];
  for (const c of args.configs) {
    for (const threads of args.threads) {
      setThreads(threads);
      const { hub, experts } = members(c);
      const model = StitchedModel.create(hub, experts, { K, init: 'random', seed: 1 });
      const tr = { ours: [] as number[], theirs: [] as number[], ratio: [] as number[] };
      const dec = { ours: [] as number[], theirs: [] as number[], ratio: [] as number[], seed: [] as number[], seedRatio: [] as number[] };
      for (let r = 0; r < args.repeat; r++) {
        const o = await trainTps(model, c, args.steps);
        tr.ours.push(o);
        const od = await decodeTps(model, c.V, 2);
        dec.ours.push(od);
        const sd = await decodeTps(hub, c.V, 2);
        dec.seed.push(sd);
        // (n+1) * seed time per token / stitched time per token: >= 1/1.1 meets the target.
        dec.seedRatio.push(od / (sd / (N_EXPERTS + 1)));
        if (torch.ok) {
          const t = await runTorch('stitch_bench.py', ['--config', c.name, '--mode', 'stitch_train', '--experts', String(N_EXPERTS), '--stitches', String(K), '--steps', String(args.steps)], { threads });
          tr.theirs.push(t.tokens_per_s);
          tr.ratio.push(o / t.tokens_per_s);
          const d = await runTorch('stitch_bench.py', ['--config', c.name, '--mode', 'stitch_decode', '--experts', String(N_EXPERTS), '--stitches', String(K)], { threads });
          dec.theirs.push(d.tokens_per_s);
          dec.ratio.push(od / d.tokens_per_s);
        }
        console.error(`  ${c.name} ${threads}t round ${r + 1}: stitch train ${o.toFixed(0)} tok/s, stitched decode ${od.toFixed(0)} tok/s, seed decode ${sd.toFixed(0)} tok/s${torch.ok ? ` (pytorch ${tr.theirs.at(-1)!.toFixed(0)}, ${dec.theirs.at(-1)!.toFixed(0)})` : ''}`);
      }
      rows.push({ name: `stitch train step (n=${N_EXPERTS}, K=${K})`, config: c.name, threads, unit: 'tokens/s', ours: median(tr.ours), anchor: torch.ok ? median(tr.theirs) : null, anchorName: torch.ok ? `pytorch ${torch.version} stitch_train` : '', ratio: torch.ok ? median(tr.ratio) : null, target: 2 });
      rows.push({ name: `stitched decode batch 1`, config: c.name, threads, unit: 'tokens/s', ours: median(dec.ours), anchor: torch.ok ? median(dec.theirs) : null, anchorName: torch.ok ? `pytorch ${torch.version} stitch_decode` : '', ratio: torch.ok ? median(dec.ratio) : null });
      rows.push({ name: `stitched decode vs (n+1) x seed`, config: c.name, threads, unit: 'tokens/s', ours: median(dec.ours), anchor: median(dec.seed) / (N_EXPERTS + 1), anchorName: `our seed decode / ${N_EXPERTS + 1}`, ratio: median(dec.seedRatio), target: Number((1 / 1.1).toFixed(3)) });
      model.dispose();
      hub.dispose();
      for (const e of experts) e.dispose();
    }
  }
  printTable(rows);
  const file = writeResults('stitch', { args: process.argv.slice(2), simd: info().simd }, rows);
  console.log(`results: ${file}`);
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
