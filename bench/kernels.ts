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
 *
 * npm run bench:kernels -- --device cuda [--quick] [--only <substring>] [--emulated]
 *
 * The CUDA kernels (issue "The CUDA backend"): builds `bts_bench_cuda` (native/cuda/bench/bench_cuda.cu,
 * CMake into the same build dir) and runs it: every op entry of native/cuda on device-resident buffers,
 * timed with cudaEvents (median over launches with the L2 flushed before each, plus back to back),
 * TFLOP/s or GB/s and the fraction of the device's peak (SM count and clock, memory clock and bus width
 * from the device; per-SM throughput by compute capability, see the table in bench_cuda.cu). Writes
 * bench/results/kernels-cuda.jsonl (a `_meta` row, the `_device` row, then one row per case: name, op,
 * ours, unit, bound, anchor (the peak), anchorName, ratio (the fraction), device, us, warmUs, ...).
 * Without nvcc (CMake found no CUDA compiler) or without a usable GPU it prints ONE line saying why
 * and exits 0 without measuring or writing anything. `--emulated` runs the same benchmark built against
 * the SIMT emulator (tiny shapes, on the CPU) to check its logic: its timings are meaningless, it is
 * labelled so, and nothing is written. --device cpu (the default) is the CPU benchmark above.
 * $BTS_BENCH_BUILD_DIR overrides the build dir (default build-bench/).
 */
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(fileURLToPath(import.meta.url), '..', '..');
const buildDir = process.env.BTS_BENCH_BUILD_DIR ? resolve(process.env.BTS_BENCH_BUILD_DIR) : join(root, 'build-bench');

// --device cpu|cuda (or --device=...) is ours; every other argument goes to the executable.
function splitDevice(argv: string[]): { device: string; rest: string[] } {
  let device = 'cpu';
  const rest: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--device') device = argv[++i] ?? '';
    else if (a.startsWith('--device=')) device = a.slice('--device='.length);
    else rest.push(a);
  }
  return { device, rest };
}
const { device, rest: args } = splitDevice(process.argv.slice(2));

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

/**
 * Runs a benchmark executable and hands each JSON line of its stdout (lines starting with '{') to
 * `onRow` as it arrives; resolves with the exit code.
 */
function runJsonLines(exe: string, exeArgs: string[], env: NodeJS.ProcessEnv, onRow: (r: Record<string, unknown>) => void): Promise<number | null> {
  return new Promise((resolve, reject) => {
    const child = spawn(exe, exeArgs, { stdio: ['ignore', 'pipe', 'inherit'], env });
    let buf = '';
    child.stdout.on('data', (d: Buffer) => {
      buf += d.toString();
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i).trim();
        buf = buf.slice(i + 1);
        if (line.startsWith('{')) onRow(JSON.parse(line) as Record<string, unknown>);
      }
    });
    child.on('error', reject);
    child.on('exit', (code) => resolve(code));
  });
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

const fmt = (x: number | null, d = 1) => (x === null ? '-' : x.toFixed(d));
/** Four significant digits below 100 (emulated rates are tiny), one decimal above. */
const sig = (x: number) => (Math.abs(x) >= 100 ? x.toFixed(1) : x.toPrecision(4));

async function main() {
  const exe = build();
  const rows: Row[] = [];
  console.log(`${'kernel'.padEnd(52)} ${'thr'.padStart(3)} ${'ours'.padStart(9)} ${'anchor'.padStart(9)} ${'ratio'.padStart(6)}  unit     anchor`);
  const code = await runJsonLines(exe, args, { ...process.env, OPENBLAS_NUM_THREADS: '2' }, (raw) => {
    const r = raw as unknown as Row;
    rows.push(r);
    console.log(
      `${r.name.padEnd(52)} ${String(r.threads).padStart(3)} ${fmt(r.ours).padStart(9)} ${fmt(r.anchor).padStart(9)} ${fmt(r.ratio, 2).padStart(6)}  ${r.unit.padEnd(8)} ${r.anchorName}`,
    );
  });
  if (code !== 0) throw new Error(`bench exited with ${code}`);

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

// ---- CUDA ---------------------------------------------------------------------------------------------

interface CudaRow {
  name: string;
  op: string;
  ours: number;
  unit: string;
  bound: string;
  anchor: number | null;
  anchorName: string;
  ratio: number | null;
  device: string;
  emulated: boolean;
  us: number;
  warmUs: number;
  work: number;
  reps: number;
}

/** Why this machine cannot have a usable NVIDIA GPU, from the device nodes alone (Linux), else null. */
function noGpuReason(): string | null {
  if (process.platform !== 'linux') return null; // the benchmark's own cudaGetDeviceCount decides
  if (['/dev/nvidiactl', '/dev/nvidia0', '/dev/dxg'].some((f) => existsSync(f))) return null;
  return 'no NVIDIA GPU: no /dev/nvidiactl, /dev/nvidia0 or /dev/dxg (no driver loaded or no device)';
}

/** The CUDA compiler CMake found for `dir` (after configuring it), or null. */
function cmakeCudaCompiler(dir: string): string | null {
  const cache = join(dir, 'CMakeCache.txt');
  if (!existsSync(cache)) return null;
  const m = /^CMAKE_CUDA_COMPILER:[A-Z]+=(.*)$/m.exec(readFileSync(cache, 'utf8'));
  const v = m ? m[1].trim() : '';
  return v && !v.endsWith('NOTFOUND') ? v : null;
}

function skip(why: string): void {
  console.log(`bench: CUDA kernel benchmark not run: ${why}; nothing measured, no results written`);
}

async function mainCuda() {
  const emulated = args.includes('--emulated');
  const exeArgs = args.filter((a) => a !== '--emulated');
  if (!emulated) {
    const why = noGpuReason();
    if (why) return skip(why);
  }
  console.error('bench: configuring (cmake, Release) ...');
  execFileSync('cmake', ['-S', root, '-B', buildDir, '-DCMAKE_BUILD_TYPE=Release'], { stdio: ['ignore', 'ignore', 'inherit'] });
  if (!emulated && !cmakeCudaCompiler(buildDir)) return skip('CMake found no CUDA compiler (nvcc; set CUDACXX or put it on PATH)');
  const target = emulated ? 'bts_bench_cuda_emu' : 'bts_bench_cuda';
  console.error(`bench: building ${target} ...`);
  execFileSync('cmake', ['--build', buildDir, '-j', '2', '--target', target], { stdio: ['ignore', 'ignore', 'inherit'] });
  const exe = join(buildDir, target);
  if (!existsSync(exe)) throw new Error(`bench: ${exe} was not built`);

  const rows: CudaRow[] = [];
  // Filled by the stdout handler (an object, so that TypeScript does not narrow them to null).
  const got: { dev: Record<string, unknown> | null; noDevice: string | null } = { dev: null, noDevice: null };
  const code = await runJsonLines(exe, exeArgs, process.env, (r) => {
    if (r.name === '_no_device') got.noDevice = String(r.reason);
    else if (r.name === '_device') {
      got.dev = r;
      const peaks = `fp32 ${r.fp32TFLOPs ?? 'unknown'} TFLOP/s, bf16 tensor ${r.bf16TFLOPs ?? 'unknown'} TFLOP/s, DRAM ${r.dramGBs ?? 'unknown'} GB/s`;
      console.log(r.emulated ? 'device: SIMT emulator on the CPU (EMULATED: the timings below measure the emulator and mean nothing)'
        : `device: ${r.device} (cc ${r.cc}, ${r.sms} SMs, ${r.clockMHz} MHz); peaks ${peaks} (${r.peakSource})`);
      console.log(`${'kernel'.padEnd(64)} ${'us'.padStart(10)} ${'warm us'.padStart(10)} ${'ours'.padStart(9)} unit     ${'peak'.padStart(6)}`);
    } else {
      const c = r as unknown as CudaRow;
      rows.push(c);
      const frac = c.ratio === null ? '-' : `${(100 * c.ratio).toFixed(1)}%`;
      console.log(`${c.name.padEnd(64)} ${fmt(c.us).padStart(10)} ${fmt(c.warmUs).padStart(10)} ${sig(c.ours).padStart(9)} ${c.unit.padEnd(8)} ${frac.padStart(6)}${c.anchorName ? ` of ${c.anchorName}` : ''}`);
    }
  });
  if (code === 3 && got.noDevice !== null) return skip(`no usable CUDA device: ${got.noDevice}`);
  if (code !== 0) throw new Error(`bench: ${target} exited with ${code}`);
  const dev = got.dev;
  if (!dev) throw new Error(`bench: ${target} printed no _device line`);

  const summary = (label: string, pick: (r: CudaRow) => boolean) => {
    const f = rows.filter((r) => pick(r) && r.ratio !== null).map((r) => r.ratio!);
    if (f.length) console.log(`  ${label}: median ${(100 * median(f)).toFixed(1)}% of peak over ${f.length} case(s)`);
  };
  if (emulated) {
    console.log(`\n${rows.length} case(s) ran under the emulator (logic check only); nothing written`);
    return;
  }
  console.log('\nFractions of peak:');
  summary('fp32 GEMM (CUDA cores)', (r) => r.name.startsWith('gemm_f32 '));
  summary('tensor-core GEMM (bf16 WMMA)', (r) => r.bound === 'compute-bf16-tc');
  summary('attention (CUDA cores)', (r) => r.op.startsWith('attention'));
  summary('memory-bound kernels (DRAM)', (r) => r.bound === 'memory');

  const dir = join(root, 'bench', 'results');
  mkdirSync(dir, { recursive: true });
  const out = join(dir, 'kernels-cuda.jsonl');
  const meta = { name: '_meta', date: new Date().toISOString(), args: process.argv.slice(2), node: process.version };
  writeFileSync(out + '.tmp', [meta, dev, ...rows].map((r) => JSON.stringify(r)).join('\n') + '\n');
  renameSync(out + '.tmp', out);
  console.log(`\nwrote ${out}`);
}

if (device !== 'cpu' && device !== 'cuda') {
  console.error(`bench: --device must be cpu or cuda, got ${JSON.stringify(device)}`);
  process.exitCode = 2;
} else {
  (device === 'cuda' ? mainCuda : main)().catch((e) => {
    console.error(e instanceof Error ? e.message : e);
    process.exitCode = 1;
  });
}
