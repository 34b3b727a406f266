// The CUDA kernel benchmark's logic, checked on the CPU: runs `bts_bench_cuda_emu` (the same source as
// `bts_bench_cuda`, native/cuda/bench/bench_cuda.cu, compiled by the C++ compiler against the SIMT
// emulator; CMake builds it with or without nvcc) and checks what it reports, against computations of
// its own: every op entry declared in native/cuda/bts_cuda.h has at least one row; each row is finite and
// positive; the GEMM rows' work is 2 M N K of the shape in their name; each row's figure is its work
// over its time in the stated unit; nothing emulated claims a peak or a fraction of one, and the device
// is called "emulator". The benchmark itself fails (exit 1) when an op throws or leaves a non-finite
// value in its output, so a clean exit is checked too. Timings under emulation mean nothing and are not
// looked at beyond being positive.
// Also, where this machine has no NVIDIA device node: `bench/kernels.ts --device cuda` prints one line
// saying why and exits 0 without writing bench/results/kernels-cuda.jsonl.
// The CMake build dir is $BTS_CMAKE_BUILD_DIR (default build-cmake). Skipped, saying why, when the
// executable is not built; in CI (.ci/run builds every target) a missing executable is a failure.
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const root = resolve(fileURLToPath(import.meta.url), '..', '..', '..');
const buildDir = resolve(root, process.env.BTS_CMAKE_BUILD_DIR ?? 'build-cmake');
const exe = join(buildDir, 'bts_bench_cuda_emu');
const built = existsSync(exe);
const inCI = !!process.env.CI;

interface Row {
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

function run(args: string[]) {
  const r = spawnSync(exe, args, { encoding: 'utf8', timeout: 60_000 });
  const objs = (r.stdout ?? '')
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>);
  return { status: r.status, stderr: `${r.stderr ?? ''}${r.error ? String(r.error) : ''}`, objs };
}

/** The op entries of the CUDA backend, read from its header (bts::cuda::<name>(const XParams&, ...)). */
function cudaEntries(): string[] {
  const h = readFileSync(join(root, 'native', 'cuda', 'bts_cuda.h'), 'utf8');
  return [...h.matchAll(/^void (\w+)\(const \w+Params& \w+, cudaStream_t/gm)].map((m) => m[1]);
}

if (!built) {
  describe('the CUDA kernel benchmark under the SIMT emulator', () => {
    if (inCI)
      it('is built in CI', () => {
        expect(built, `${exe} is not built`).toBe(true);
      });
    else it.skip(`skipped: ${exe} is not built (cmake --build ${buildDir} --target bts_bench_cuda_emu)`, () => {});
  });
} else {
  const full = run([]);
  const device = full.objs.find((o) => o.name === '_device');
  const rows = full.objs.filter((o) => !String(o.name).startsWith('_')) as unknown as Row[];

  describe('the CUDA kernel benchmark under the SIMT emulator', () => {
    it('ran to the end and exited 0', () => {
      expect(full.status, full.stderr).toBe(0);
      expect(full.stderr).toMatch(new RegExp(`bts_bench_cuda: ${rows.length} case\\(s\\)`));
    });

    it('labels the device as the emulator, with no peaks', () => {
      expect(device).toBeDefined();
      expect(device!.device).toBe('emulator');
      expect(device!.emulated).toBe(true);
      expect(device!.fp32TFLOPs).toBeNull();
      expect(device!.bf16TFLOPs).toBeNull();
      expect(device!.dramGBs).toBeNull();
    });

    it('times every op entry of bts_cuda.h, and both GEMM maths', () => {
      const entries = cudaEntries();
      expect(entries.length).toBeGreaterThanOrEqual(18);
      const seen = new Set(rows.map((r) => r.op));
      for (const op of entries) expect(seen.has(op) || seen.has(`${op} (Bf16TensorCore)`), op).toBe(true);
      expect(seen.has('gemm_f32')).toBe(true);
      expect(seen.has('gemm_f32 (Bf16TensorCore)')).toBe(true);
      for (const op of seen) expect(entries, op).toContain(op.replace(' (Bf16TensorCore)', ''));
    });

    it('case names are unique', () => {
      expect(new Set(rows.map((r) => r.name)).size).toBe(rows.length);
    });

    it('every row is finite and positive, emulated, without a peak or fraction', () => {
      expect(rows.length).toBeGreaterThan(20);
      for (const r of rows) {
        for (const k of ['ours', 'us', 'warmUs', 'work'] as const) {
          expect(Number.isFinite(r[k]), `${r.name} ${k}=${r[k]}`).toBe(true);
          expect(r[k], `${r.name} ${k}`).toBeGreaterThan(0);
        }
        expect(r.reps).toBeGreaterThanOrEqual(1);
        expect(r.emulated, r.name).toBe(true);
        expect(r.device).toBe('emulator');
        expect(r.anchor, r.name).toBeNull();
        expect(r.ratio, r.name).toBeNull();
        expect(['TFLOP/s', 'GB/s']).toContain(r.unit);
        expect(r.unit === 'GB/s', r.name).toBe(r.bound === 'memory');
      }
    });

    it('each figure is its work over its time in the stated unit', () => {
      for (const r of rows) {
        const perSecond = r.work / (r.us * 1e-6);
        const expected = r.unit === 'GB/s' ? perSecond / 1e9 : perSecond / 1e12;
        // Both printed with 6 significant digits.
        expect(Math.abs(r.ours - expected) / expected, r.name).toBeLessThan(1e-4);
      }
    });

    it('GEMM work is 2 M N K of the shape in the name; tensor-core rows are bound by the bf16 peak', () => {
      const gemms = rows.filter((r) => r.op.startsWith('gemm'));
      expect(gemms.length).toBeGreaterThanOrEqual(10);
      for (const r of gemms) {
        const m = /(\d+)x(\d+)x(\d+)/.exec(r.name);
        expect(m, r.name).not.toBeNull();
        const [M, N, K] = [Number(m![1]), Number(m![2]), Number(m![3])];
        expect(r.work, r.name).toBe(2 * M * N * K);
        expect(r.bound, r.name).toBe(r.op === 'gemm_f32' ? 'compute-fp32' : 'compute-bf16-tc');
      }
    });

    it('--only keeps the matching cases; an unknown argument is a usage error', () => {
      const only = run(['--only', 'rope_']);
      expect(only.status, only.stderr).toBe(0);
      const names = only.objs.filter((o) => !String(o.name).startsWith('_')).map((o) => String(o.name));
      expect(names.length).toBeGreaterThanOrEqual(2);
      for (const n of names) expect(n).toContain('rope_');
      expect(run(['--bogus']).status).toBe(2);
      expect(run(['--only', 'no such case']).status).toBe(2);
    });
  });
}

// bench/kernels.ts --device cuda without a GPU: one line, exit 0, nothing written. Decided by the device
// nodes before any build, so this is quick; where a GPU may exist it would run the real benchmark.
const gpuNodes = ['/dev/nvidiactl', '/dev/nvidia0', '/dev/dxg'].filter((f) => existsSync(f));
describe('npm run bench:kernels -- --device cuda without a GPU', () => {
  if (process.platform !== 'linux' || gpuNodes.length > 0) {
    it.skip(`skipped: this machine may have a GPU (${gpuNodes.join(', ') || process.platform})`, () => {});
    return;
  }
  it('prints one line saying why, exits 0 and writes no results', () => {
    const out = join(root, 'bench', 'results', 'kernels-cuda.jsonl');
    const before = existsSync(out) ? statSync(out).mtimeMs : null;
    const r = spawnSync(process.execPath, ['--import', 'tsx', join(root, 'bench', 'kernels.ts'), '--device', 'cuda'], {
      cwd: root,
      encoding: 'utf8',
      timeout: 60_000,
    });
    expect(r.status, r.stderr).toBe(0);
    const lines = r.stdout.split('\n').filter((l) => l.trim() !== '');
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/not run: no NVIDIA GPU.*no results written/);
    expect(existsSync(out) ? statSync(out).mtimeMs : null).toBe(before);
  });
  it('rejects an unknown device', () => {
    const r = spawnSync(process.execPath, ['--import', 'tsx', join(root, 'bench', 'kernels.ts'), '--device', 'tpu'], {
      cwd: root,
      encoding: 'utf8',
      timeout: 60_000,
    });
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/--device must be cpu or cuda, got "tpu"/);
  });
});
