/**
 * npm run bench:infer [-- --config a,b] [-- --threads 2] [-- --repeat 3] [-- --quick] [-- --no-torch]
 *
 * Inference speed of our engine beside PyTorch 1.13 (Debian) on the same model and threads:
 * - prefill: one [1, T] prompt through the model with a KV cache (tokens/s = T / time);
 * - decode: batch-1 greedy generation of 128 tokens after a 16-token prompt, tokens/s of the decode
 *   phase only. Ours runs through the public async API (LlamaModel.prefill / decode, AsyncWorkers on
 *   Node's default libuv pool of 4 threads, which must not fight the 2 compute threads), greedy
 *   argmax in JS included; PyTorch runs its best: inference_mode, preallocated KV cache.
 * Weights fp32 on both sides (and ours also with frozen bf16 weights, reported without an anchor).
 * Targets (issue 3): prefill >= 2x, decode >= 10x PyTorch.
 */
import { setThreads, info } from '../lib/runtime.js';
import { LlamaModel } from '../lib/model/llama.js';
import { argmax } from '../lib/infer/sampling.js';
import { runTorch, torchAvailable, type BenchConfig } from './torch.js';
import { llamaConfigOf, median, parseBenchArgs, printTable, randomTokens, writeResults, type ResultRow } from './common.js';

const args = parseBenchArgs(process.argv.slice(2), { configs: 'a,b', threads: '2', repeat: 3, steps: 3 });
const PROMPT = 16;
const NEW = 128;

async function oursInfer(model: LlamaModel, c: BenchConfig, reps: number): Promise<{ prefill: number; decode: number }> {
  const V = c.V;
  const out = new Float32Array(V);
  const prefillTimes: number[] = [];
  const decodeTimes: number[] = [];
  const cache = model.createCache(1, Math.max(c.T, PROMPT + NEW + 1));
  try {
    for (let r = 0; r <= reps; r++) {
      cache.reset(0);
      const prompt = randomTokens(c.T, V, 5 + r);
      let t0 = performance.now();
      await model.prefill(cache, 0, prompt, out);
      if (r > 0) prefillTimes.push((performance.now() - t0) / 1000);
      cache.reset(0);
      await model.prefill(cache, 0, prompt.subarray(0, PROMPT), out);
      const tok = new Int32Array(1);
      const slot = new Int32Array([0]);
      tok[0] = argmax(out);
      t0 = performance.now();
      for (let s = 0; s < NEW; s++) {
        await model.decode(cache, slot, tok, out);
        tok[0] = argmax(out);
      }
      if (r > 0) decodeTimes.push((performance.now() - t0) / 1000);
    }
  } finally {
    cache.dispose();
  }
  return { prefill: c.T / median(prefillTimes), decode: NEW / median(decodeTimes) };
}

async function main(): Promise<void> {
  const torch = args.noTorch ? { ok: false, why: '--no-torch' } : await torchAvailable();
  if (!torch.ok) console.error(`bench:infer: PyTorch anchor unavailable (${torch.why}); printing our figures only`);
  const rows: ResultRow[] = [];
  for (const c of args.configs) {
    for (const threads of args.threads) {
      setThreads(threads);
      const model = LlamaModel.random(llamaConfigOf(c), { seed: 3 });
      const ours = { prefill: [] as number[], decode: [] as number[] };
      const theirs = { prefill: [] as number[], decode: [] as number[] };
      const ratios = { prefill: [] as number[], decode: [] as number[] };
      for (let r = 0; r < args.repeat; r++) {
        const o = await oursInfer(model, c, args.steps);
        ours.prefill.push(o.prefill);
        ours.decode.push(o.decode);
        if (torch.ok) {
          for (const mode of ['prefill', 'decode'] as const) {
            const t = await runTorch('llama_bench.py', ['--config', c.name, '--mode', mode, '--steps', String(args.steps)], { threads });
            theirs[mode].push(t.tokens_per_s);
            ratios[mode].push(o[mode] / t.tokens_per_s);
          }
        }
        console.error(`  ${c.name} ${threads}t round ${r + 1}: prefill ${o.prefill.toFixed(0)}, decode ${o.decode.toFixed(0)} tok/s${torch.ok ? ` (pytorch ${theirs.prefill.at(-1)!.toFixed(0)}, ${theirs.decode.at(-1)!.toFixed(0)})` : ''}`);
      }
      for (const [mode, target] of [['prefill', 2], ['decode', 10]] as const) {
        rows.push({
          name: mode === 'prefill' ? `prefill [1, ${c.T}] fp32` : `decode batch 1 fp32 (${PROMPT}+${NEW})`,
          config: c.name,
          threads,
          unit: 'tokens/s',
          ours: median(ours[mode]),
          anchor: torch.ok ? median(theirs[mode]) : null,
          anchorName: torch.ok ? `pytorch ${torch.version} ${mode}` : '',
          ratio: torch.ok ? median(ratios[mode]) : null,
          target,
        });
      }
      // Ours with frozen bf16 block weights (half the bytes per decoded token); no like-for-like anchor.
      const bf = LlamaModel.fromParams(model.config, model.params!.slice());
      bf.setPrecision('bf16');
      const ob = await oursInfer(bf, c, args.steps);
      bf.dispose();
      rows.push({ name: `decode batch 1 bf16 weights`, config: c.name, threads, unit: 'tokens/s', ours: ob.decode, anchor: null, anchorName: '', ratio: null });
      model.dispose();
    }
  }
  printTable(rows);
  const file = writeResults('infer', { args: process.argv.slice(2), simd: info().simd }, rows);
  console.log(`results: ${file}`);
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
