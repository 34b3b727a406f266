// The CUDA kernels (native/cuda/*.cu) run under the SIMT emulator (native/emu) against the CPU
// references: this runs the standalone executable `bts_cuda_emu_test` (test/cuda/cuda_ops_test.cc,
// built by CMake with the C++ compiler whether or not nvcc exists) and turns each of its result lines
//   PASS|FAIL <op> <shape...> max_err=<e> tol=<t>
// into one assertion. The build dir is $BTS_CMAKE_BUILD_DIR (default build-cmake):
//   cmake -S . -B build-cmake -DCMAKE_BUILD_TYPE=Release && cmake --build build-cmake -j2 --target bts_cuda_emu_test
// Skipped, with that message, when the executable is not built. See docs/CUDA.md.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { resolve } from 'node:path';
import { describe, expect, it } from 'vitest';

const buildDir = resolve(process.env.BTS_CMAKE_BUILD_DIR ?? 'build-cmake');
const exe = resolve(buildDir, 'bts_cuda_emu_test');
const built = existsSync(exe);

interface Line {
  status: 'PASS' | 'FAIL' | 'SKIP';
  op: string;
  rest: string;
  err?: number;
  tol?: number;
}

function runAll(): { lines: Line[]; summary: string; status: number | null; stderr: string } {
  const r = spawnSync(exe, [], { encoding: 'utf8', timeout: 110_000 });
  const lines: Line[] = [];
  let summary = '';
  for (const raw of (r.stdout ?? '').split('\n')) {
    const m = /^(PASS|FAIL|SKIP) (\S+) (.*)$/.exec(raw);
    if (m) {
      const err = /max_err=(\S+)/.exec(m[3]);
      const tol = /tol=(\S+)/.exec(m[3]);
      lines.push({
        status: m[1] as Line['status'],
        op: m[2],
        rest: m[3],
        err: err ? Number(err[1]) : undefined,
        tol: tol ? Number(tol[1]) : undefined,
      });
    } else if (raw.startsWith('SUMMARY')) summary = raw;
  }
  return { lines, summary, status: r.status, stderr: `${r.stderr ?? ''}${r.error ? String(r.error) : ''}` };
}

// Every op of ops.h has a CUDA kernel; each must report at least one result line.
const OPS = [
  'gemm_f32',
  'gemm_f32_tc',
  'gemm_bf16',
  'attention_forward',
  'attention_backward',
  'rmsnorm_forward',
  'rmsnorm_backward',
  'rope_table',
  'rope_forward',
  'swiglu_forward',
  'swiglu_backward',
  'embedding_forward',
  'embedding_backward',
  'cross_entropy',
  'adamw',
  'stitch_eh_forward',
  'stitch_eh_backward',
  'stitch_he_forward',
  'stitch_he_backward',
];

// In CI (.ci/run builds every CMake target) a missing executable or a skipped op is a failure.
const inCI = !!process.env.CI;

if (!built) {
  describe('CUDA kernels under the SIMT emulator', () => {
    if (inCI)
      it('is built in CI', () => {
        expect(built, `${exe} is not built`).toBe(true);
      });
    else it.skip(`skipped: ${exe} is not built (cmake --build ${buildDir} --target bts_cuda_emu_test)`, () => {});
  });
} else {
  const run = runAll();
  describe('CUDA kernels under the SIMT emulator', () => {
    it('the executable ran to its summary line', () => {
      expect(run.summary, run.stderr).toMatch(/^SUMMARY pass=\d+ fail=\d+ skip=\d+/);
    });

    for (const op of OPS) {
      const mine = run.lines.filter((l) => l.op === op);
      if (mine.length > 0 && mine.every((l) => l.status === 'SKIP')) {
        if (inCI)
          it(`${op} runs in CI`, () => {
            expect(mine[0].status, mine[0].rest).toBe('PASS');
          });
        else it.skip(`${op}: ${mine[0].rest}`, () => {});
        continue;
      }
      describe(op, () => {
        it('has results', () => {
          expect(mine.length).toBeGreaterThan(0);
        });
        for (const l of mine.filter((x) => x.status !== 'SKIP')) {
          it(l.rest.replace(/ max_err=.*$/, ''), () => {
            expect(l.status, l.rest).toBe('PASS');
            if (l.err !== undefined && l.tol !== undefined) expect(l.err).toBeLessThanOrEqual(l.tol);
          });
        }
      });
    }

    it('the race detector catches a missing __syncthreads', () => {
      const races = run.lines.filter((l) => l.op === 'emulator' && /race/.test(l.rest) && !/no_race/.test(l.rest));
      expect(races.length).toBeGreaterThanOrEqual(2);
      for (const l of races) expect(l.status, l.rest).toBe('PASS');
    });

    it('the emulator reports barrier divergence and passes correct barriers', () => {
      const other = run.lines.filter((l) => l.op === 'emulator' && (/no_race/.test(l.rest) || !/race/.test(l.rest)));
      expect(other.length).toBeGreaterThanOrEqual(2);
      for (const l of other) expect(l.status, l.rest).toBe('PASS');
    });

    it('exits 0 exactly when nothing failed', () => {
      const failed = run.lines.some((l) => l.status === 'FAIL');
      expect(run.status).toBe(failed ? 1 : 0);
    });
  });
}
