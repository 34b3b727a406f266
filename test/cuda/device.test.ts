// The device switch and the CUDA addon's safe loader (lib/device.ts), and the CPU/CUDA consistency of
// every op (STYLE.md habit 8: one file runs every op on every backend against the CPU one).
//
// What runs where:
// - Always: device selection, the CPU fallback of 'auto' (one stderr line, in a child process so that
//   "once per process" is real), DeviceUnavailableError for 'cuda', and fake CUDA binaries set through
//   BTS_CUDA_PATH (not an ELF file, a module that segfaults while loading, one that hangs, one without
//   probe(), one reporting a pre-Ampere GPU): the child probe turns each into a reason and this process
//   survives.
// - When CMake built bts_cuda.node (nvcc present; CI builds it): the binary loads in a child without a
//   GPU, exports probe(), needs neither libcudart nor libcuda at load time, and lists exactly the CPU
//   addon's ops; without libcuda.so.1 its probe names it.
// - Every op through the CUDA addon against the CPU addon, on each CUDA target there is: a real GPU
//   (skipped, saying why, when there is none) and bts_cuda_emu.node (the same binding and kernels over
//   the SIMT emulator, built by CMake with or without nvcc), which is what checks the binding here.
// The CMake build dir is $BTS_CMAKE_BUILD_DIR (default build-cmake). In CI a missing build is a failure.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cudaAddon, cudaStatus, getDevice, resolveDevice, setDevice, type Device } from '../../lib/device.js';
import { ArgumentError, CudaError, DeviceUnavailableError, ShapeError, TokenRangeError, fromNative } from '../../lib/errors.js';
import { native, type NativeTensor } from '../../lib/native.js';
import * as ops from '../../lib/ops/index.js';
import { toBf16 } from '../../lib/ops/gemm.js';
import { randIds, randn, relErr } from '../helpers.js';

const root = resolve(fileURLToPath(import.meta.url), '..', '..', '..');
const buildDir = resolve(root, process.env.BTS_CMAKE_BUILD_DIR ?? 'build-cmake');
const emuPath = join(buildDir, 'bts_cuda_emu.node');
const realPath = join(buildDir, 'bts_cuda.node');
const inCI = !!process.env.CI;
const hasNvcc = spawnSync('nvcc', ['--version'], { encoding: 'utf8' }).status === 0;
const hasLibcuda = /libcuda\.so\.1\b/.test(spawnSync('ldconfig', ['-p'], { encoding: 'utf8' }).stdout ?? '');

/** Runs `code` (an ES module importing lib/*.ts) in a fresh Node with tsx; returns its output. */
function child(code: string, env: Record<string, string | undefined>) {
  const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', code], {
    cwd: root,
    env: { ...process.env, BTS_QUIET: undefined, BTS_DEVICE: undefined, ...env },
    encoding: 'utf8',
    timeout: 60_000,
  });
  return { status: r.status, stdout: r.stdout ?? '', stderr: r.stderr ?? '', lines: (r.stderr ?? '').split('\n').filter((l) => l) };
}

/** Sets env vars for the duration of fn (restored even when it throws). */
function withEnv<T>(env: Record<string, string | undefined>, fn: () => T): T {
  const old: Record<string, string | undefined> = {};
  for (const k of Object.keys(env)) {
    old[k] = process.env[k];
    if (env[k] === undefined) delete process.env[k];
    else process.env[k] = env[k];
  }
  try {
    return fn();
  } finally {
    for (const k of Object.keys(old)) {
      if (old[k] === undefined) delete process.env[k];
      else process.env[k] = old[k];
    }
  }
}

/** RMSNorm in double, independently of the addon: the reference for the device checks. */
function rmsnormJs(x: Float32Array, w: Float32Array, eps: number): Float64Array {
  const D = w.length;
  const out = new Float64Array(x.length);
  for (let n = 0; n < x.length / D; n++) {
    let s = 0;
    for (let d = 0; d < D; d++) s += x[n * D + d] ** 2;
    const r = 1 / Math.sqrt(s / D + eps);
    for (let d = 0; d < D; d++) out[n * D + d] = x[n * D + d] * r * w[d];
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------
let fakes = '';
const fake = (name: string) => join(fakes, name);
beforeAll(() => {
  fakes = mkdtempSync(join(tmpdir(), 'bts-cuda-fakes-'));
  writeFileSync(fake('garbage.node'), 'this is not an ELF shared object\n'.repeat(8));
  writeFileSync(fake('segv.cjs'), "process.kill(process.pid, 'SIGSEGV');\n");
  writeFileSync(fake('hang.cjs'), 'for (;;) {}\n');
  writeFileSync(fake('noprobe.cjs'), 'module.exports = { listOps: () => [] };\n');
  writeFileSync(
    fake('stale.cjs'),
    'module.exports = { listOps: () => [{ name: "gemm_f32", tensors: [], scalars: [] }], probe: () => ({ runtimeVersion: 13000,\n' +
      "  driverVersion: 13000, emulated: false, devices: [{ index: 0, name: 'Fake A100', cc: '8.0', memory: 4e10, sms: 108, supported: true }] }) };\n",
  );
  writeFileSync(
    fake('oldgpu.cjs'),
    'module.exports = { listOps: () => [], probe: () => ({ runtimeVersion: 13000, driverVersion: 13000, emulated: false,\n' +
      "  devices: [{ index: 0, name: 'Tesla T4', cc: '7.5', memory: 16e9, sms: 40, supported: false }] }) };\n",
  );
});
afterAll(() => {
  if (fakes) rmSync(fakes, { recursive: true, force: true });
});

describe('device selection', () => {
  // Independent of a BTS_DEVICE the test run may have been started with (checked in a child below).
  beforeAll(() => setDevice('cpu'));

  it("validates device values; 'cpu' resolves to the CPU", () => {
    expect(getDevice()).toBe('cpu');
    expect(resolveDevice('cpu')).toBe('cpu');
    expect(() => setDevice('gpu' as Device)).toThrow(ArgumentError);
    expect(() => resolveDevice('gpu' as Device)).toThrow(/'cpu', 'cuda' or 'auto', got 'gpu'/);
    const x = randn(6, 1);
    expect(() => ops.rmsnormForward({ x, weight: randn(3, 2), device: 'tpu' as Device })).toThrow(ArgumentError);
  });

  it("the process default is 'cpu', or BTS_DEVICE (a bad value is an error naming it)", () => {
    const code = "import { getDevice } from './lib/device.ts'; console.log(getDevice());";
    const dflt = child(code, {});
    expect(dflt.stdout.trim(), dflt.stderr).toBe('cpu');
    const ok = child(code, { BTS_DEVICE: 'auto' });
    expect(ok.stdout.trim(), ok.stderr).toBe('auto');
    const bad = child("import { getDevice } from './lib/device.ts'; try { getDevice(); } catch (e) { console.log(e.code, e.message); }", {
      BTS_DEVICE: 'gpu',
    });
    expect(bad.stdout).toMatch(/^E_ARGUMENT BTS_DEVICE must be 'cpu', 'cuda' or 'auto', got 'gpu'/);
  });

  it("ops with device 'cpu' and 'auto' give the CPU results", () => {
    const N = 7;
    const D = 19;
    const x = randn(N * D, 3);
    const weight = randn(D, 4, 0.5, 1.5);
    const ref = rmsnormJs(x, weight, 1e-5);
    const cpu = ops.rmsnormForward({ x, weight, device: 'cpu' }).out;
    const dflt = ops.rmsnormForward({ x, weight }).out;
    const auto = withEnv({ BTS_QUIET: '1' }, () => ops.rmsnormForward({ x, weight, device: 'auto' }).out);
    expect(relErr(cpu, ref)).toBeLessThan(1e-6);
    expect(Array.from(dflt)).toEqual(Array.from(cpu));
    // 'auto' is the CPU here unless a CUDA device is present, where it is the GPU (FMA: last bits).
    if (resolveDevice('auto') === 'cpu') expect(Array.from(auto)).toEqual(Array.from(cpu));
    else expect(relErr(auto, ref)).toBeLessThan(1e-5);
  });
});

describe('CPU fallback when CUDA is unavailable', () => {
  // A binary that cannot load makes the outcome the same on every machine, GPU or not.
  const env = () => ({ BTS_CUDA_PATH: fake('garbage.node') });

  it("'auto' falls back to the CPU with exactly one line on stderr, once per process", () => {
    const code = `
      import { resolveDevice } from './lib/device.ts';
      import * as ops from './lib/ops/index.ts';
      const x = new Float32Array([1, 2, 3, 4, 5, 6]), weight = new Float32Array([1, 1, 1]);
      const a = ops.rmsnormForward({ x, weight, device: 'auto' }).out;
      const b = await ops.rmsnormForwardAsync({ x, weight, device: 'auto' });
      const c = ops.rmsnormForward({ x, weight, device: 'cpu' }).out;
      console.log(resolveDevice('auto'), resolveDevice('auto'), JSON.stringify([...a]) === JSON.stringify([...c]) && JSON.stringify([...b.out]) === JSON.stringify([...c]));
    `;
    const r = child(code, env());
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout.trim()).toBe('cpu cpu true');
    expect(r.lines, r.stderr).toHaveLength(1);
    expect(r.lines[0]).toMatch(/^branch-train-stitch: CUDA is not available \(.*garbage\.node could not be loaded: .*\); running on the CPU/);
  });

  it('BTS_QUIET=1 silences that line', () => {
    const r = child("import { resolveDevice } from './lib/device.ts'; console.log(resolveDevice('auto'));", { ...env(), BTS_QUIET: '1' });
    expect(r.stdout.trim(), r.stderr).toBe('cpu');
    expect(r.lines).toHaveLength(0);
  });

  it("'cuda' throws DeviceUnavailableError with the reason, from resolveDevice, ops and setDevice", async () => {
    await withEnv(env(), async () => {
      expect(() => resolveDevice('cuda')).toThrow(DeviceUnavailableError);
      let err: unknown;
      try {
        ops.rmsnormForward({ x: randn(4, 1), weight: randn(2, 2), device: 'cuda' });
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(DeviceUnavailableError);
      expect((err as DeviceUnavailableError).code).toBe('E_DEVICE');
      expect((err as Error).message).toMatch(/device 'cuda' was requested but CUDA is not available: .*garbage\.node could not be loaded/);
      await expect(ops.gemmAsync({ a: randn(4, 1), b: randn(4, 2), m: 2, n: 2, k: 2, device: 'cuda' })).rejects.toThrow(DeviceUnavailableError);
      setDevice('cuda');
      try {
        expect(() => ops.swigluForward({ gate: randn(4, 1), up: randn(4, 2) })).toThrow(DeviceUnavailableError);
      } finally {
        setDevice('cpu');
      }
      expect(ops.swigluForward({ gate: randn(4, 1), up: randn(4, 2) }).h).toHaveLength(4);
    });
  });
});

describe('the child probe survives broken CUDA binaries (BTS_CUDA_PATH)', () => {
  const status = (file: string, extra: Record<string, string> = {}) =>
    withEnv({ BTS_CUDA_PATH: file, ...extra }, () => cudaStatus({ refresh: true }));

  it('a file that is not a shared object', () => {
    const s = status(fake('garbage.node'));
    expect(s.available).toBe(false);
    expect(s.why).toMatch(/garbage\.node could not be loaded: .*(ELF|header|too short)/i);
  });

  it('a module that crashes the process while loading (SIGSEGV)', () => {
    const s = status(fake('segv.cjs'));
    expect(s.available).toBe(false);
    expect(s.why).toMatch(/crashed the probe process \(SIGSEGV\)/);
    expect(process.pid).toBeGreaterThan(0); // still here
  });

  it('a module that hangs (the probe times out)', () => {
    const s = status(fake('hang.cjs'), { BTS_CUDA_PROBE_TIMEOUT_MS: '1500' });
    expect(s.available).toBe(false);
    expect(s.why).toMatch(/did not finish within 1500 ms/);
  });

  it('a module without probe(), a pre-Ampere GPU, a missing file', () => {
    expect(status(fake('noprobe.cjs')).why).toMatch(/does not export probe\(\)/);
    const old = status(fake('oldgpu.cjs'));
    expect(old.available).toBe(false);
    expect(old.devices?.[0].name).toBe('Tesla T4');
    expect(old.why).toMatch(/Tesla T4 \(device 0\) has compute capability 7\.5; the CUDA kernels need 8\.0/);
    expect(status(fake('missing.node')).why).toMatch(/BTS_CUDA_PATH=.*missing\.node: no such file/);
  });

  it('a CUDA build from another version (its op specs differ from the CPU addon\'s) is refused', () => {
    const s = status(fake('stale.cjs'));
    expect(s.available).toBe(false);
    expect(s.devices?.[0].supported).toBe(true);
    expect(s.why).toMatch(/stale\.cjs was built from another version of branch-train-stitch/);
  });
});

// ---------------------------------------------------------------------------------------------------
describe('this machine', () => {
  const s = cudaStatus();
  if (s.available) {
    it.skip(`CUDA is available here (${s.why}): the unavailable-machine checks do not apply`, () => {});
    return;
  }
  it('cudaStatus() reports CUDA unavailable with a reason naming what is missing', () => {
    expect(s.available).toBe(false);
    if (!s.path) expect(s.why).toMatch(/no CUDA build of the addon \(bts_cuda\.node\) was found/);
    else if (!hasLibcuda) expect(s.why).toMatch(/libcuda\.so\.1 \(the NVIDIA driver library\) could not be loaded/);
    else expect(s.why).toMatch(/device|driver|cuda/i);
    expect(s.searched.length).toBeGreaterThan(0);
  });
});

describe('the CUDA addon built by CMake (bts_cuda.node)', () => {
  if (!existsSync(realPath)) {
    if (inCI && hasNvcc)
      it('is built in CI (nvcc is present)', () => {
        expect(existsSync(realPath), `${realPath} is not built`).toBe(true);
      });
    else it.skip(`skipped: ${realPath} is not built (${hasNvcc ? 'cmake --build build-cmake --target bts_cuda' : 'no nvcc'})`, () => {});
    return;
  }
  const probeChild = () => {
    const r = spawnSync(
      process.execPath,
      ['-e', 'const m = require(process.argv[1]); console.log(JSON.stringify({ keys: Object.keys(m), probe: m.probe(), ops: m.listOps() }));', realPath],
      { encoding: 'utf8', timeout: 60_000 },
    );
    expect(r.status, r.stderr).toBe(0);
    return JSON.parse(r.stdout) as { keys: string[]; probe: Record<string, unknown>; ops: unknown };
  };

  it('loads without a GPU and exports probe, listOps, callOp, callOpAsync, llamaCreate, stitchedCreate', () => {
    const { keys, probe } = probeChild();
    expect(keys.sort()).toEqual(['callOp', 'callOpAsync', 'listOps', 'llamaCreate', 'probe', 'stitchedCreate']);
    expect(probe.emulated).toBe(false);
    expect(probe.runtimeVersion as number).toBeGreaterThanOrEqual(12000);
    if (!hasLibcuda) {
      expect(probe.error).toMatch(/libcuda\.so\.1 \(the NVIDIA driver library\) could not be loaded/);
      expect(probe.devices).toEqual([]);
    }
  });

  it('its op list (names, tensors, scalars) equals the CPU addon\'s', () => {
    expect(probeChild().ops).toEqual(native().listOps());
  });

  it('needs neither libcudart nor libcuda to load (the runtime is linked statically)', () => {
    const r = spawnSync('readelf', ['-d', realPath], { encoding: 'utf8' });
    if (r.status !== 0) return; // no binutils: the child load above already showed it
    const needed = [...r.stdout.matchAll(/\(NEEDED\)\s+Shared library: \[([^\]]+)\]/g)].map((m) => m[1]);
    expect(needed.length).toBeGreaterThan(0);
    expect(needed.filter((l) => /cuda/i.test(l))).toEqual([]);
  });

  it('cudaStatus() through it names what is missing when there is no driver', () => {
    if (hasLibcuda) return;
    const s = withEnv({ BTS_CUDA_PATH: realPath }, () => cudaStatus({ refresh: true }));
    expect(s.available).toBe(false);
    expect(s.path).toBe(realPath);
    expect(s.why).toMatch(/libcuda\.so\.1/);
  });
});

// ---------------------------------------------------------------------------------------------------
// Every op on each CUDA target, against the CPU addon (which test/ops/ checks against the references).
interface Target {
  label: string;
  path: string;
}
const targets: Target[] = [];
{
  const s = cudaStatus();
  if (s.available && s.path && !s.emulated) targets.push({ label: `GPU: ${s.why}`, path: s.path });
  else describe('ops on a CUDA GPU', () => it.skip(`skipped: no CUDA device (${s.why})`, () => {}));
  if (existsSync(emuPath)) targets.push({ label: 'SIMT emulator (bts_cuda_emu.node)', path: emuPath });
  else
    describe('ops on the emulated CUDA addon', () => {
      if (inCI)
        it('is built in CI', () => {
          expect(existsSync(emuPath), `${emuPath} is not built`).toBe(true);
        });
      else it.skip(`skipped: ${emuPath} is not built (cmake --build build-cmake --target bts_cuda_emu_node)`, () => {});
    });
}

for (const t of targets) {
  describe(`ops on CUDA (${t.label}) against the CPU`, () => {
    let saved: string | undefined;
    beforeAll(() => {
      saved = process.env.BTS_CUDA_PATH;
      process.env.BTS_CUDA_PATH = t.path;
      const s = cudaStatus({ refresh: true });
      expect(s.available, s.why).toBe(true);
    });
    afterAll(() => {
      if (saved === undefined) delete process.env.BTS_CUDA_PATH;
      else process.env.BTS_CUDA_PATH = saved;
    });
    // fp32 ops: the GPU contracts a*b+c into FMA, the CPU build may not: last-bit differences.
    const TOL = 2e-5;

    it('lists the same ops as the CPU addon', () => {
      expect(cudaAddon().listOps()).toEqual(native().listOps());
    });

    it('gemm (NN, NT, TN, beta accumulate, strided) and gemmBf16', () => {
      const [m, n, k] = [37, 29, 45];
      for (const [transA, transB] of [
        [false, false],
        [false, true],
        [true, false],
      ] as const) {
        const a = randn(m * k, 11);
        const b = randn(k * n, 12);
        const c0 = randn(m * n, 13);
        const args = { a, b, m, n, k, transA, transB, alpha: 0.75, beta: 0.5 };
        const cpu = ops.gemm({ ...args, c: c0.slice(), device: 'cpu' });
        const gpu = ops.gemm({ ...args, c: c0.slice(), device: 'cuda' });
        expect(relErr(gpu, cpu), `transA=${transA} transB=${transB}`).toBeLessThan(TOL);
      }
      const a = randn(5 * 40, 14);
      const b = randn(9 * 33, 15);
      const strided = { a, b, m: 5, n: 9, k: 33, lda: 40, ldb: 33, transB: true, ldc: 12 };
      expect(relErr(ops.gemm({ ...strided, device: 'cuda' }), ops.gemm({ ...strided, device: 'cpu' }))).toBeLessThan(TOL);
      const w = toBf16(randn(n * k, 16));
      const x = randn(m * k, 17);
      // CUDA rounds a to bf16 for the tensor cores; the CPU keeps it fp32 unless it has AVX512_BF16.
      expect(relErr(ops.gemmBf16({ a: x, b: w, m, n, k, device: 'cuda' }), ops.gemmBf16({ a: x, b: w, m, n, k, device: 'cpu' }))).toBeLessThan(1.5e-2);
    });

    it('attention forward (GQA, KV cache with Tq < Tk < Tcap) and backward', () => {
      const [B, H, Hkv, Dh, Tq, Tk, Tcap] = [2, 4, 2, 16, 3, 7, 9];
      const q = randn(B * Tq * H * Dh, 21);
      const k = randn(B * Tcap * Hkv * Dh, 22);
      const v = randn(B * Tcap * Hkv * Dh, 23);
      const f = { q, k, v, batch: B, heads: H, kvHeads: Hkv, headDim: Dh, tq: Tq, tk: Tk, tcap: Tcap };
      const cpu = ops.attentionForward({ ...f, device: 'cpu' });
      const gpu = ops.attentionForward({ ...f, device: 'cuda' });
      expect(relErr(gpu.out, cpu.out)).toBeLessThan(TOL);
      expect(relErr(gpu.lse, cpu.lse)).toBeLessThan(TOL);
      const T = 11;
      const qb = randn(B * T * H * Dh, 24);
      const kb = randn(B * T * Hkv * Dh, 25);
      const vb = randn(B * T * Hkv * Dh, 26);
      const fw = ops.attentionForward({ q: qb, k: kb, v: vb, batch: B, heads: H, kvHeads: Hkv, headDim: Dh, device: 'cpu' });
      const bargs = { q: qb, k: kb, v: vb, out: fw.out, lse: fw.lse, dout: randn(qb.length, 27), batch: B, heads: H, kvHeads: Hkv, headDim: Dh };
      const bc = ops.attentionBackward({ ...bargs, device: 'cpu' });
      const bg = ops.attentionBackward({ ...bargs, device: 'cuda' });
      expect(relErr(bg.dq, bc.dq)).toBeLessThan(1e-4);
      expect(relErr(bg.dk, bc.dk)).toBeLessThan(1e-4);
      expect(relErr(bg.dv, bc.dv)).toBeLessThan(1e-4);
    });

    it('rmsnorm forward (also in place) and backward (dweight accumulated)', () => {
      const [N, D] = [9, 70];
      const x = randn(N * D, 31);
      const weight = randn(D, 32, 0.5, 1.5);
      const cpu = ops.rmsnormForward({ x, weight, device: 'cpu' });
      const gpu = ops.rmsnormForward({ x, weight, device: 'cuda' });
      expect(relErr(gpu.out, cpu.out)).toBeLessThan(TOL);
      expect(relErr(gpu.rstd, cpu.rstd)).toBeLessThan(TOL);
      const inPlace = x.slice();
      ops.rmsnormForward({ x: inPlace, weight, out: inPlace, device: 'cuda' });
      expect(relErr(inPlace, cpu.out)).toBeLessThan(TOL);
      const dw0 = randn(D, 33);
      const b = { x, weight, rstd: cpu.rstd, dout: randn(N * D, 34) };
      const bc = ops.rmsnormBackward({ ...b, dweight: dw0.slice(), device: 'cpu' });
      const bg = ops.rmsnormBackward({ ...b, dweight: dw0.slice(), device: 'cuda' });
      expect(relErr(bg.dx, bc.dx)).toBeLessThan(TOL);
      expect(relErr(bg.dweight!, bc.dweight!)).toBeLessThan(TOL);
    });

    it('rope table (llama3 scaling) and forward/inverse, strided; a bad position is an ArgumentError', () => {
      const tArgs = { positions: 33, headDim: 16, theta: 500000, scaling: { factor: 8, originalMaxPositionEmbeddings: 16 } };
      const tc = ops.ropeTable({ ...tArgs, device: 'cpu' });
      const tg = ops.ropeTable({ ...tArgs, device: 'cuda' });
      expect(relErr(tg.invFreq, tc.invFreq)).toBeLessThan(1e-7);
      expect(relErr(tg.table, tc.table)).toBeLessThan(1e-6);
      const N = 6;
      const x = randn(N * 40, 41); // [N, 2 heads, 16] rows at a stride of 40 floats
      const pos = randIds(N, 33, 42);
      const f = { x, pos, table: tc.table, headDim: 16, heads: 2, ldX: 40 };
      for (const inverse of [false, true]) {
        const c = ops.ropeForward({ ...f, inverse, device: 'cpu' }).out;
        const g = ops.ropeForward({ ...f, inverse, device: 'cuda' }).out;
        expect(relErr(g, c)).toBeLessThan(TOL);
      }
      const bad = pos.slice();
      bad[4] = 33;
      expect(() => ops.ropeForward({ ...f, pos: bad, device: 'cuda' })).toThrow(/'pos'\[4\] = 33 is outside/);
      expect(() => ops.ropeForward({ ...f, pos: bad, device: 'cuda' })).toThrow(ArgumentError);
    });

    it('swiglu forward and backward', () => {
      const n = 7 * 53;
      const gate = randn(n, 51, -4, 4);
      const up = randn(n, 52);
      expect(relErr(ops.swigluForward({ gate, up, device: 'cuda' }).h, ops.swigluForward({ gate, up, device: 'cpu' }).h)).toBeLessThan(TOL);
      const b = { gate, up, dh: randn(n, 53) };
      const bc = ops.swigluBackward({ ...b, device: 'cpu' });
      const bg = ops.swigluBackward({ ...b, device: 'cuda' });
      expect(relErr(bg.dgate, bc.dgate)).toBeLessThan(TOL);
      expect(relErr(bg.dup, bc.dup)).toBeLessThan(TOL);
    });

    it('embedding forward and backward (repeated ids accumulate); a bad id is a TokenRangeError', () => {
      const [N, V, D] = [13, 11, 24];
      const ids = randIds(N, V, 61);
      ids[3] = ids[7];
      const table = randn(V * D, 62);
      const fc = ops.embeddingForward({ ids, table, dim: D, device: 'cpu' }).out;
      const fg = ops.embeddingForward({ ids, table, dim: D, device: 'cuda' }).out;
      expect(Array.from(fg)).toEqual(Array.from(fc));
      const dout = randn(N * D, 63);
      const d0 = randn(V * D, 64);
      const bc = ops.embeddingBackward({ ids, dout, dtable: d0.slice(), dim: D, device: 'cpu' }).dtable;
      const bg = ops.embeddingBackward({ ids, dout, dtable: d0.slice(), dim: D, device: 'cuda' }).dtable;
      expect(relErr(bg, bc)).toBeLessThan(TOL);
      const bad = ids.slice();
      bad[5] = V;
      expect(() => ops.embeddingForward({ ids: bad, table, dim: D, device: 'cuda' })).toThrow(TokenRangeError);
    });

    it('cross-entropy with the LM head (ignored rows, backward, dweight accumulated)', () => {
      const [N, D, V] = [10, 24, 300];
      const x = randn(N * D, 71);
      const weight = randn(V * D, 72, -0.3, 0.3);
      const targets = randIds(N, V, 73);
      targets[2] = -100;
      const dw0 = randn(V * D, 74);
      const a = { x, weight, targets, gradScale: 1 / 9, backward: true };
      const c = ops.crossEntropy({ ...a, dweight: dw0.slice(), device: 'cpu' });
      const g = ops.crossEntropy({ ...a, dweight: dw0.slice(), device: 'cuda' });
      expect(g.count).toBe(9);
      expect(g.count).toBe(c.count);
      expect(Math.abs(g.lossSum - c.lossSum) / Math.abs(c.lossSum)).toBeLessThan(TOL);
      expect(relErr(g.losses, c.losses)).toBeLessThan(TOL);
      expect(relErr(g.dx!, c.dx!)).toBeLessThan(1e-4);
      expect(relErr(g.dweight!, c.dweight!)).toBeLessThan(1e-4);
      const bad = targets.slice();
      bad[0] = V;
      expect(() => ops.crossEntropy({ x, weight, targets: bad, device: 'cuda' })).toThrow(TokenRangeError);
    });

    it('adamw step with clipping and weight decay on a prefix (state updated in place)', () => {
      const n = 1000;
      const mk = () => ({ params: randn(n, 81), grads: randn(n, 82, -3, 3), m: randn(n, 83, -0.1, 0.1), v: randn(n, 84, 0, 0.1) });
      const h = { lr: 1e-2, weightDecay: 0.1, nDecay: 600, step: 3, maxGradNorm: 1 };
      const c = mk();
      const g = mk();
      const rc = ops.adamwStep({ ...c, ...h, device: 'cpu' });
      const rg = ops.adamwStep({ ...g, ...h, device: 'cuda' });
      expect(Math.abs(rg.gradNorm - rc.gradNorm) / rc.gradNorm).toBeLessThan(TOL);
      expect(relErr(g.params, c.params)).toBeLessThan(TOL);
      expect(relErr(g.m, c.m)).toBeLessThan(TOL);
      expect(relErr(g.v, c.v)).toBeLessThan(TOL);
    });

    it('stitch E->H and H->E, forward and backward', () => {
      const [N, D, n] = [5, 12, 3];
      const ND = N * D;
      const h0 = randn(ND, 91);
      const p = randn(n * ND, 92);
      const gate = randn(ND * (n + 1), 93, -2, 2);
      const dout = randn(ND, 94);
      expect(relErr(ops.stitchEHForward({ h0, p, gate, experts: n, device: 'cuda' }).out, ops.stitchEHForward({ h0, p, gate, experts: n, device: 'cpu' }).out)).toBeLessThan(TOL);
      const ec = ops.stitchEHBackward({ h0, p, gate, dout, experts: n, device: 'cpu' });
      const eg = ops.stitchEHBackward({ h0, p, gate, dout, experts: n, device: 'cuda' });
      for (const key of ['dh0', 'dp', 'dgate'] as const) expect(relErr(eg[key], ec[key]), key).toBeLessThan(TOL);
      const h = randn(n * ND, 95);
      const q = randn(n * ND, 96);
      const dh = randn(n * ND, 97);
      expect(relErr(ops.stitchHEForward({ h, q, gate, experts: n, device: 'cuda' }).out, ops.stitchHEForward({ h, q, gate, experts: n, device: 'cpu' }).out)).toBeLessThan(TOL);
      const hc = ops.stitchHEBackward({ h, q, gate, dout: dh, experts: n, device: 'cpu' });
      const hg = ops.stitchHEBackward({ h, q, gate, dout: dh, experts: n, device: 'cuda' });
      for (const key of ['dh', 'dq', 'dgate'] as const) expect(relErr(hg[key], hc[key]), key).toBeLessThan(TOL);
    });

    it('async calls (several in flight) give the sync results', async () => {
      const [N, D] = [6, 33];
      const xs = [0, 1, 2].map((i) => randn(N * D, 100 + i));
      const weight = randn(D, 104, 0.5, 1.5);
      const res = await Promise.all(xs.map((x) => ops.rmsnormForwardAsync({ x, weight, device: 'cuda' })));
      xs.forEach((x, i) => expect(Array.from(res[i].out)).toEqual(Array.from(ops.rmsnormForward({ x, weight, device: 'cuda' }).out)));
      await expect(ops.embeddingForwardAsync({ ids: new Int32Array([0, 99]), table: randn(8, 1), dim: 2, device: 'cuda' })).rejects.toThrow(TokenRangeError);
    });

    it('the native argument checks are the CPU addon\'s (same code, same message)', () => {
      const call = (addon: { callOp: (name: string, t: NativeTensor[], s: number[]) => void }) => {
        try {
          addon.callOp('rmsnorm_forward', [new Float32Array(12), new Float32Array(4), new Float32Array(11), null], [3, 4, 1e-5]);
        } catch (e) {
          return `${(e as { code: string }).code}: ${(e as Error).message}`;
        }
        return 'no error';
      };
      const cpu = call(native());
      expect(cpu).toBe("E_SHAPE: rmsnorm_forward: argument 'out' has 11 elements, expected N*D = 12");
      expect(call(cudaAddon())).toBe(cpu);
      expect(() => cudaAddon().callOp('rmsnorm_forward', [new Float64Array(12), new Float32Array(4), new Float32Array(12), null], [3, 4, 1e-5])).toThrow(
        /argument 'x' must be f32, got f64/,
      );
      // Typed errors through the ops layer too (its own checks come first, so go one level down).
      expect(() => ops.gemm({ a: randn(3, 1), b: randn(4, 1), m: 2, n: 2, k: 2, device: 'cuda' })).toThrow(ShapeError);
      // A failed CUDA call (E_CUDA, with file and line) becomes a CudaError.
      expect(fromNative(Object.assign(new Error('gemm.cu:12: cudaMalloc: out of memory'), { code: 'E_CUDA' }))).toBeInstanceOf(CudaError);
    });
  });
}
