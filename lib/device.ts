/**
 * Where ops run: `'cpu'`, `'cuda'` or `'auto'`, and the safe loader of the CUDA addon.
 *
 * The CUDA backend is a separate binary, `bts_cuda.node` (native/cuda/binding.cc), so that the
 * portable CPU addon loads everywhere. Loading a CUDA binary into the process can go wrong in ways no
 * try/catch survives (a driver that aborts or crashes on initialisation), so {@link cudaStatus} first
 * PROBES the binary in a child process (`process.execPath` requiring it and calling its `probe()`, with
 * a timeout) and loads it in-process only when the child came back with a usable device. Everything
 * that can be missing becomes a reason in words: no CUDA build, a file that is not a loadable addon,
 * no `libcuda.so.1` (no NVIDIA driver), a driver older than the CUDA runtime the addon was built
 * with, no device, a device older than compute capability 8.0, a crash or a hang of the probe, a
 * CUDA build from another version of the package (its op specs differ from the CPU addon's).
 *
 * Where the CUDA addon is looked for, first found wins:
 *   1. `BTS_CUDA_PATH` (an explicit .node file; nothing else is searched when it is set);
 *   2. `<package>/build-cmake/bts_cuda.node` (plain CMake build, docs/CUDA.md);
 *   3. `<package>/build/Release/cuda/bts_cuda.node` (cmake-js build; kept out of build/Release itself,
 *      where node-gyp-build loads the first .node file it sees as the CPU addon);
 *   4. `<package>/prebuilds/<platform>-<arch>/cuda/bts_cuda.node` (a packaged CUDA build; in a
 *      subfolder for the same reason).
 *
 * Device choice: every op takes `device?: Device`; its default is the process default, set by
 * {@link setDevice} or the environment variable `BTS_DEVICE`, itself `'cpu'` unless set, so nothing
 * is probed unless CUDA is asked for. `'auto'` uses CUDA when available, else the CPU, and then says
 * why in ONE line on stderr, once per process (`BTS_QUIET=1` silences it). `'cuda'` when CUDA is not
 * available throws {@link DeviceUnavailableError} with the reason.
 *
 * Other environment: `BTS_CUDA_DEVICE` (GPU index, default 0), `BTS_CUDA_PROBE_TIMEOUT_MS` (the
 * child probe's limit, default 30000).
 *
 * Known limits: the op-level CUDA path copies every argument to the GPU and the outputs back on each
 * call (docs/CUDA.md); it is for single ops and tests, the engine keeps tensors on the device. The
 * probe result is cached per addon path for the life of the process (`cudaStatus({ refresh: true })`
 * probes again, but an addon already loaded in-process stays loaded).
 */
import { spawnSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join, resolve } from 'node:path';
import { ArgumentError, DeviceUnavailableError } from './errors.js';
import { native, packageRoot, type NativeOpSpec, type NativeTensor } from './native.js';

/** Where an op runs: the CPU, a CUDA GPU, or CUDA when available and the CPU otherwise. */
export type Device = 'cpu' | 'cuda' | 'auto';

/** One CUDA device as the addon's probe sees it. */
export interface CudaDeviceInfo {
  /** CUDA device index (`BTS_CUDA_DEVICE` selects one; default 0). */
  index: number;
  /** Marketing name, e.g. "NVIDIA H100 80GB HBM3". */
  name: string;
  /** Compute capability "major.minor" (e.g. "9.0"); "emulated" for the SIMT emulator build. */
  cc: string;
  /** Global memory in bytes (0 for the emulator). */
  memory: number;
  /** Streaming multiprocessors. */
  sms: number;
  /** Whether the kernels can run on it (compute capability >= 8.0: bf16 tensor cores). */
  supported: boolean;
}

/** What the CUDA addon's `probe()` returns (never throws; failures are in `error`). */
export interface CudaProbe {
  /** CUDA runtime version the addon was built with (linked statically), e.g. 13000 for 13.0; 0 emulated. */
  runtimeVersion: number;
  /** Highest CUDA version the installed driver supports (e.g. 13000), 0 when there is no driver. */
  driverVersion: number;
  /** true for bts_cuda_emu.node: the kernels run on the CPU under the SIMT emulator (tests only). */
  emulated: boolean;
  /** The devices found (possibly empty). */
  devices: CudaDeviceInfo[];
  /** Why no device can be used (no driver library, driver too old, no device), when that is so. */
  error?: string;
}

/** The result of {@link cudaStatus}. */
export interface CudaStatus {
  /** true when CUDA ops can run: the addon loaded and the selected device is usable. */
  available: boolean;
  /** When unavailable: what is missing, in words. When available: the device and the binary used. */
  why: string;
  /** The bts_cuda.node file found (absent when none was found). */
  path?: string;
  /** Every path looked at, in order. */
  searched: string[];
  /** From the probe, when it ran: the runtime the addon was built with. */
  runtimeVersion?: number;
  /** From the probe, when it ran: the CUDA version the driver supports (0: no driver). */
  driverVersion?: number;
  /** From the probe, when it ran: the emulated (test) build. */
  emulated?: boolean;
  /** From the probe, when it ran: the devices found. */
  devices?: CudaDeviceInfo[];
  /** The device index ops use (`BTS_CUDA_DEVICE`, default 0). */
  deviceIndex: number;
}

/** The typed surface of bts_cuda.node (declared here, the only module that loads it). */
export interface CudaAddon {
  probe(): CudaProbe;
  listOps(): NativeOpSpec[];
  callOp(name: string, tensors: NativeTensor[], scalars: (number | boolean)[]): void;
  callOpAsync(name: string, tensors: NativeTensor[], scalars: (number | boolean)[]): Promise<void>;
}

const DEVICES: readonly Device[] = ['cpu', 'cuda', 'auto'];
const DEFAULT_PROBE_TIMEOUT_MS = 30_000;

/** Checks a device value (`what` names it in the message). */
/** Validates a device name (`what` names the argument in the ArgumentError). */
export function checkDevice(d: unknown, what: string): Device {
  if (typeof d === 'string' && (DEVICES as readonly string[]).includes(d)) return d as Device;
  throw new ArgumentError(`${what} must be 'cpu', 'cuda' or 'auto', got ${typeof d === 'string' ? `'${d}'` : String(d)}`);
}

let processDefault: Device | undefined;

/** The process default device: the last {@link setDevice}, else `BTS_DEVICE`, else `'cpu'`. */
export function getDevice(): Device {
  if (processDefault === undefined) {
    const env = process.env.BTS_DEVICE;
    processDefault = env === undefined || env === '' ? 'cpu' : checkDevice(env, 'BTS_DEVICE');
  }
  return processDefault;
}

/**
 * Sets the process default device for ops called without `device`. Probes nothing by itself: with
 * `'cuda'`, the first op throws {@link DeviceUnavailableError} if CUDA is unavailable.
 */
export function setDevice(d: Device): void {
  processDefault = checkDevice(d, 'setDevice: device');
}

/** The CUDA addon locations, in search order (see the module comment). */
export function cudaSearchPaths(): string[] {
  const explicit = process.env.BTS_CUDA_PATH;
  if (explicit) return [resolve(explicit)];
  const plat = `${process.platform}-${process.arch}`;
  return [
    join(packageRoot, 'build-cmake', 'bts_cuda.node'),
    join(packageRoot, 'build', 'Release', 'cuda', 'bts_cuda.node'),
    join(packageRoot, 'prebuilds', plat, 'cuda', 'bts_cuda.node'),
  ];
}

// The child's script (CommonJS, `node -e`): load, probe, list ops, print one JSON line. A failure to
// load is reported as a value; a crash or hang is seen by the parent as a signal or a timeout.
const PROBE_SCRIPT = `
let out;
try {
  const m = require(process.env.BTS_CUDA_PROBE_FILE);
  if (!m || typeof m.probe !== 'function') out = { loadError: 'it does not export probe()' };
  else out = { probe: m.probe(), ops: typeof m.listOps === 'function' ? m.listOps() : [] };
} catch (e) {
  out = { loadError: String((e && e.message) || e) };
}
process.stdout.write('BTS_PROBE ' + JSON.stringify(out) + '\\n');
`;

interface ProbeOutcome {
  probe?: CudaProbe;
  ops?: NativeOpSpec[];
  failure?: string;
}

function firstLine(s: string): string {
  return s.split('\n').map((l) => l.trim()).find((l) => l.length > 0) ?? '';
}

/** Runs the addon's probe() in a child process; never throws. */
function probeInChild(file: string): ProbeOutcome {
  const t = Number(process.env.BTS_CUDA_PROBE_TIMEOUT_MS);
  const timeout = Number.isFinite(t) && t > 0 ? t : DEFAULT_PROBE_TIMEOUT_MS;
  const r = spawnSync(process.execPath, ['-e', PROBE_SCRIPT], {
    env: { ...process.env, BTS_CUDA_PROBE_FILE: file, ELECTRON_RUN_AS_NODE: '1' },
    encoding: 'utf8',
    timeout,
    killSignal: 'SIGKILL',
    stdio: ['ignore', 'pipe', 'pipe'],
    maxBuffer: 4 << 20,
  });
  const stderr = firstLine(r.stderr ?? '');
  if (r.error && (r.error as NodeJS.ErrnoException).code === 'ETIMEDOUT')
    return { failure: `probing ${file} in a child process did not finish within ${timeout} ms (a hung driver?)` };
  if (r.error) return { failure: `could not start a child process to probe ${file}: ${r.error.message}` };
  if (r.signal)
    return { failure: `the CUDA addon ${file} crashed the probe process (${r.signal})${stderr ? `: ${stderr}` : ''}` };
  const line = (r.stdout ?? '').split('\n').find((l) => l.startsWith('BTS_PROBE '));
  if (!line)
    return { failure: `the probe of ${file} exited with status ${r.status} without an answer${stderr ? `: ${stderr}` : ''}` };
  let parsed: { probe?: CudaProbe; ops?: NativeOpSpec[]; loadError?: string };
  try {
    parsed = JSON.parse(line.slice('BTS_PROBE '.length)) as typeof parsed;
  } catch {
    return { failure: `the probe of ${file} answered something unreadable` };
  }
  if (parsed.loadError !== undefined) return { failure: `${file} could not be loaded: ${firstLine(parsed.loadError)}` };
  if (!parsed.probe || !Array.isArray(parsed.probe.devices)) return { failure: `${file}: probe() returned no device list` };
  if (r.status !== 0) return { failure: `the probe of ${file} exited with status ${r.status}${stderr ? `: ${stderr}` : ''}` };
  return { probe: parsed.probe, ops: parsed.ops };
}

function cudaVersion(v: number): string {
  return `${Math.floor(v / 1000)}.${Math.floor((v % 1000) / 10)}`;
}

function deviceIndex(): number {
  const env = process.env.BTS_CUDA_DEVICE;
  if (env === undefined || env === '') return 0;
  const i = Number(env);
  if (!Number.isInteger(i) || i < 0) throw new ArgumentError(`BTS_CUDA_DEVICE must be a device index (0, 1, ...), got '${env}'`);
  return i;
}

/** The CPU addon's op specs as JSON, or undefined when it cannot be loaded (ops fail anyway then). */
function cpuOpSpecs(): string | undefined {
  try {
    return JSON.stringify(native().listOps());
  } catch {
    return undefined;
  }
}

interface Entry {
  status: CudaStatus;
  addon?: CudaAddon;
}
const cache = new Map<string, Entry>();
const loaded = new Map<string, CudaAddon>();

function examine(searched: string[], index: number): Entry {
  const base = { searched, deviceIndex: index };
  const file = searched.find((p) => existsSync(p));
  if (!file) {
    const how = process.env.BTS_CUDA_PATH
      ? `BTS_CUDA_PATH=${process.env.BTS_CUDA_PATH}: no such file`
      : `no CUDA build of the addon (bts_cuda.node) was found (looked in ${searched.join(', ')}); ` +
        'build it with CMake on a machine with nvcc (docs/CUDA.md)';
    return { status: { ...base, available: false, why: how } };
  }
  if (!statSync(file).isFile()) return { status: { ...base, available: false, path: file, why: `${file} is not a file` } };
  const outcome = probeInChild(file);
  if (!outcome.probe) return { status: { ...base, available: false, path: file, why: outcome.failure ?? 'probe failed' } };
  const p = outcome.probe;
  const info = {
    ...base,
    path: file,
    runtimeVersion: p.runtimeVersion,
    driverVersion: p.driverVersion,
    emulated: p.emulated === true,
    devices: p.devices,
  };
  const unavailable = (why: string): Entry => ({ status: { ...info, available: false, why } });
  if (p.error) return unavailable(p.error);
  const dev = p.devices.find((d) => d.index === index);
  if (!dev)
    return unavailable(
      p.devices.length === 0
        ? 'no CUDA device found'
        : `BTS_CUDA_DEVICE=${index} but the devices are ${p.devices.map((d) => `${d.index}: ${d.name}`).join(', ')}`,
    );
  if (!dev.supported)
    return unavailable(`${dev.name} (device ${index}) has compute capability ${dev.cc}; the CUDA kernels need 8.0 (Ampere) or newer`);
  // Both addons must come from the same sources: the TypeScript layer sends one op's tensors and
  // scalars in the order of ITS registry. A stale CUDA build (another checkout or version) is refused.
  const cpuOps = cpuOpSpecs();
  if (cpuOps !== undefined && JSON.stringify(outcome.ops ?? []) !== cpuOps)
    return unavailable(`${file} was built from another version of branch-train-stitch (its ops differ from the CPU addon's); rebuild it`);
  let addon = loaded.get(file);
  if (!addon) {
    try {
      addon = createRequire(import.meta.url)(file) as CudaAddon;
    } catch (e) {
      return unavailable(`${file} passed its probe but could not be loaded in-process: ${(e as Error).message}`);
    }
    loaded.set(file, addon);
  }
  const runtime = p.emulated ? 'SIMT emulator, kernels on the CPU' : `CUDA ${cudaVersion(p.runtimeVersion)}, driver ${cudaVersion(p.driverVersion)}`;
  return { status: { ...info, available: true, why: `${dev.name} (cc ${dev.cc}; ${runtime}) through ${file}` }, addon };
}

function entry(refresh = false): Entry {
  const index = deviceIndex();
  const searched = cudaSearchPaths();
  const key = `${index}\0${searched.join('\0')}`;
  let e = cache.get(key);
  if (!e || refresh) {
    e = examine(searched, index);
    cache.set(key, e);
  }
  return e;
}

/**
 * Whether CUDA ops can run here, and if not, why. Finds bts_cuda.node, probes it in a child process
 * (crash- and hang-safe), then loads it in-process when a usable device was found. Cached per addon
 * path for the process; `refresh: true` probes again.
 */
export function cudaStatus(options: { refresh?: boolean } = {}): CudaStatus {
  return entry(options.refresh === true).status;
}

/** The loaded CUDA addon, or {@link DeviceUnavailableError} saying why there is none. */
export function cudaAddon(): CudaAddon {
  const e = entry();
  if (!e.addon) throw new DeviceUnavailableError(`device 'cuda' was requested but CUDA is not available: ${e.status.why}`);
  return e.addon;
}

let noticed = false;

/**
 * The device an op with `device: d` runs on: `'cpu'` or `'cuda'`. `'auto'` falls back to the CPU with
 * one line on stderr (once per process; `BTS_QUIET=1` silences it); `'cuda'` throws
 * {@link DeviceUnavailableError} when CUDA is unavailable. Default: the process default ({@link getDevice}).
 */
export function resolveDevice(d: Device = getDevice()): 'cpu' | 'cuda' {
  const dev = checkDevice(d, 'device');
  if (dev === 'cpu') return 'cpu';
  const e = entry();
  if (e.addon) return 'cuda';
  if (dev === 'cuda') throw new DeviceUnavailableError(`device 'cuda' was requested but CUDA is not available: ${e.status.why}`);
  if (!noticed) {
    noticed = true;
    if (process.env.BTS_QUIET !== '1')
      process.stderr.write(
        `branch-train-stitch: CUDA is not available (${e.status.why.replace(/\s*\n\s*/g, ' ')}); running on the CPU. BTS_QUIET=1 hides this line.\n`,
      );
  }
  return 'cpu';
}
