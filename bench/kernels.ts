/**
 * npm run bench:kernels [-- --quick] [-- --threads 1,2] [-- --only gemm|other]
 *
 * Builds the standalone native benchmark (CMake, Release, into build-bench/), runs it, and writes
 * bench/results/kernels.jsonl (one JSON object per line: name, threads, ours, anchor, ratio, unit,
 * bound) plus a table on the terminal. Anchors, measured in the same process: OpenBLAS sgemm for the
 * GEMMs (install it for the benchmark only: `apt-get install libopenblas-dev`), and the machine's own
 * FMA peak / copy bandwidth for the other kernels (the roofline limit they are bound by).
 * Targets checked at the end (issue "native foundation"): fp32 GEMM >= 0.9x OpenBLAS (median over
 * shapes, per thread count), bf16 GEMM >= 1.6x OpenBLAS fp32, every other kernel within 2x of its limit.
 */
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdirSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(fileURLToPath(import.meta.url), '..', '..');
const buildDir = join(root, 'build-bench');
const args = process.argv.slice(2);

interface Row {
  name: string;
  threads: number;
  ours: number;
  anchor: number | null;
  anchorName: string;
  ratio: number | null;
  unit: string;
  bound: string;
  layout?: string;
}

function build(): string {
  console.error('bench: building bts_bench_kernels (cmake, Release) ...');
  execFileSync('cmake', ['-S', root, '-B', buildDir, '-DCMAKE_BUILD_TYPE=Release'], { stdio: ['ignore', 'ignore', 'inherit'] });
  execFileSync('cmake', ['--build', buildDir, '-j', '2', '--target', 'bts_bench_kernels'], { stdio: ['ignore', 'ignore', 'inherit'] });
  const exe = join(buildDir, 'bts_bench_kernels');
  if (!existsSync(exe)) throw new Error(`bench: ${exe} was not built`);
  return exe;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

const fmt = (x: number | null, d = 1) => (x === null ? '-' : x.toFixed(d));

async function main() {
  const exe = build();
  const rows: Row[] = [];
  console.log(`${'kernel'.padEnd(52)} ${'thr'.padStart(3)} ${'ours'.padStart(9)} ${'anchor'.padStart(9)} ${'ratio'.padStart(6)}  unit     anchor`);
  await new Promise<void>((resolve, reject) => {
    const child = spawn(exe, args, { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, OPENBLAS_NUM_THREADS: '2' } });
    let buf = '';
    child.stdout.on('data', (d: Buffer) => {
      buf += d.toString();
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i).trim();
        buf = buf.slice(i + 1);
        if (!line.startsWith('{')) continue;
        const r = JSON.parse(line) as Row;
        rows.push(r);
        console.log(
          `${r.name.padEnd(52)} ${String(r.threads).padStart(3)} ${fmt(r.ours).padStart(9)} ${fmt(r.anchor).padStart(9)} ${fmt(r.ratio, 2).padStart(6)}  ${r.unit.padEnd(8)} ${r.anchorName}`,
        );
      }
    });
    child.on('error', reject);
    child.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`bench exited with ${code}`))));
  });

  const dir = join(root, 'bench', 'results');
  mkdirSync(dir, { recursive: true });
  const out = join(dir, 'kernels.jsonl');
  const meta = { name: '_meta', date: new Date().toISOString(), args, node: process.version };
  writeFileSync(out + '.tmp', [meta, ...rows].map((r) => JSON.stringify(r)).join('\n') + '\n');
  renameSync(out + '.tmp', out);

  console.log('\nTargets:');
  for (const t of [...new Set(rows.map((r) => r.threads))]) {
    const g = rows.filter((r) => r.threads === t && r.name.startsWith('gemm_f32') && r.ratio !== null).map((r) => r.ratio!);
    const b = rows.filter((r) => r.threads === t && r.name.startsWith('gemm_bf16') && r.ratio !== null).map((r) => r.ratio!);
    if (g.length) console.log(`  ${t} thread(s): fp32 GEMM median ${median(g).toFixed(2)}x OpenBLAS over ${g.length} shapes (target >= 0.90): ${median(g) >= 0.9 ? 'met' : 'NOT met'}`);
    if (b.length) console.log(`  ${t} thread(s): bf16 GEMM median ${median(b).toFixed(2)}x OpenBLAS fp32 (target >= 1.60): ${median(b) >= 1.6 ? 'met' : 'NOT met'}`);
    const other = rows.filter((r) => r.threads === t && !r.name.startsWith('gemm') && r.anchor !== null && r.ratio !== null);
    const far = other.filter((r) => r.ratio! < 0.5);
    if (other.length)
      console.log(`  ${t} thread(s): ${other.length - far.length}/${other.length} other kernels within 2x of their limit${far.length ? ` (not: ${far.map((r) => `${r.name} ${r.ratio!.toFixed(2)}`).join('; ')})` : ''}`);
  }
  console.log(`\nwrote ${out}`);
}

main().catch((e) => {
  console.error(e instanceof Error ? e.message : e);
  process.exitCode = 1;
});
