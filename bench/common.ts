/**
 * Shared pieces of the engine benchmarks (bench/train.ts, bench/infer.ts, bench/stitch.ts): the
 * benchmark configs as Llama configs, seeded random tokens, flag parsing, the results file
 * (bench/results/<name>.jsonl: a `_meta` line, then one JSON object per measurement with ours, the
 * anchor and their ratio) and the terminal table.
 *
 * Fair comparison rules (issue 3): the same model, the same thread count, in the same run; PyTorch
 * with its best settings (bench/torch.ts: tcmalloc + OMP_WAIT_POLICY=PASSIVE where faster). Ours and
 * the anchor alternate `--repeat` times (separate processes for the anchor) and the reported ratio is
 * the median of the per-round ratios, so a noisy neighbour hurts both sides of a round alike.
 */
import { mkdirSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseLlamaConfig, type LlamaConfig } from '../lib/formats/hf-config.js';
import { Rng } from '../lib/util/random.js';
import { BENCH_CONFIGS, type BenchConfig } from './torch.js';

export const root = join(fileURLToPath(import.meta.url), '..', '..');

/** The Llama config of a benchmark config (untied head, theta 1e4, eps 1e-5: as bench/torch/llama.py). */
export function llamaConfigOf(c: BenchConfig): LlamaConfig {
  return parseLlamaConfig({
    model_type: 'llama',
    vocab_size: c.V,
    hidden_size: c.D,
    intermediate_size: c.F,
    num_hidden_layers: c.L,
    num_attention_heads: c.H,
    num_key_value_heads: c.Hkv,
    max_position_embeddings: Math.max(1024, c.T + 256),
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    tie_word_embeddings: false,
  });
}

/** Seeded uniform token ids [n] in [0, V). */
export function randomTokens(n: number, V: number, seed: number): Int32Array {
  const r = new Rng(seed, 11);
  const out = new Int32Array(n);
  for (let i = 0; i < n; i++) out[i] = r.int(V);
  return out;
}

/** A seeded random next-token batch of B rows of T: inputs [B*T], targets [B*T] (shifted by one). */
export function randomBatch(c: { B: number; T: number; V: number }, seed: number): { inputs: Int32Array; targets: Int32Array } {
  const toks = randomTokens(c.B * (c.T + 1), c.V, seed);
  const inputs = new Int32Array(c.B * c.T);
  const targets = new Int32Array(c.B * c.T);
  for (let b = 0; b < c.B; b++) {
    inputs.set(toks.subarray(b * (c.T + 1), b * (c.T + 1) + c.T), b * c.T);
    targets.set(toks.subarray(b * (c.T + 1) + 1, (b + 1) * (c.T + 1)), b * c.T);
  }
  return { inputs, targets };
}

/** Flags: --config a,b --threads 1,2 --repeat N --steps S --quick, and free-form extras. */
export interface BenchArgs {
  configs: BenchConfig[];
  threads: number[];
  repeat: number;
  steps: number;
  quick: boolean;
  noTorch: boolean;
  has(flag: string): boolean;
  get(flag: string): string | undefined;
}

export function parseBenchArgs(argv: string[], defaults: { configs: string; threads: string; repeat: number; steps: number }): BenchArgs {
  const get = (flag: string): string | undefined => {
    const i = argv.indexOf(flag);
    return i >= 0 ? argv[i + 1] : undefined;
  };
  const has = (flag: string): boolean => argv.includes(flag);
  const quick = has('--quick');
  const configs = (get('--config') ?? (quick ? 'a' : defaults.configs)).split(',').map((n) => {
    const c = BENCH_CONFIGS[n as keyof typeof BENCH_CONFIGS];
    if (!c) throw new Error(`unknown --config ${n} (a, b, tiny)`);
    return c;
  });
  const threads = (get('--threads') ?? defaults.threads).split(',').map(Number);
  if (threads.some((t) => !Number.isInteger(t) || t < 1)) throw new Error(`bad --threads ${get('--threads')}`);
  return {
    configs,
    threads,
    repeat: Number(get('--repeat') ?? (quick ? 1 : defaults.repeat)),
    steps: Number(get('--steps') ?? (quick ? Math.max(2, Math.floor(defaults.steps / 2)) : defaults.steps)),
    quick,
    noTorch: has('--no-torch'),
    has,
    get,
  };
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** One line of a results file. */
export interface ResultRow {
  name: string;
  config: string;
  threads: number;
  unit: string;
  ours: number;
  anchor: number | null;
  anchorName: string;
  ratio: number | null;
  target?: number;
  [k: string]: unknown;
}

/** Writes bench/results/<name>.jsonl atomically (meta line first). */
export function writeResults(name: string, meta: Record<string, unknown>, rows: ResultRow[]): string {
  const dir = join(root, 'bench', 'results');
  mkdirSync(dir, { recursive: true });
  const file = join(dir, `${name}.jsonl`);
  const text = [JSON.stringify({ name: '_meta', date: new Date().toISOString(), node: process.version, ...meta }), ...rows.map((r) => JSON.stringify(r))].join('\n') + '\n';
  const tmp = `${file}.tmp-${process.pid}`;
  writeFileSync(tmp, text);
  renameSync(tmp, file);
  return file;
}

/** Prints the rows as a table (ratio = ours / anchor; target shown when set). */
export function printTable(rows: ResultRow[]): void {
  const fmt = (x: number | null, d = 1): string => (x === null ? '-' : x >= 100 ? x.toFixed(0) : x.toFixed(d));
  console.log(`${'measurement'.padEnd(34)} ${'cfg'.padEnd(4)} ${'thr'.padStart(3)} ${'ours'.padStart(9)} ${'anchor'.padStart(9)} ${'ratio'.padStart(6)} ${'target'.padStart(6)}  unit`);
  for (const r of rows) {
    const ok = r.target === undefined || r.ratio === null ? ' ' : r.ratio >= r.target ? ' ' : '!';
    console.log(`${r.name.padEnd(34)} ${r.config.padEnd(4)} ${String(r.threads).padStart(3)} ${fmt(r.ours).padStart(9)} ${fmt(r.anchor).padStart(9)} ${(r.ratio === null ? '-' : r.ratio.toFixed(2) + 'x').padStart(6)} ${(r.target === undefined ? '' : r.target + 'x').padStart(6)}${ok} ${r.unit}`);
  }
}
