"""Shared plumbing of the PyTorch anchor benchmarks (llama_bench.py, stitch_bench.py): thread setup,
the record of the settings a run actually had, the timing loop, the FLOP formulas and the one JSON
line each run prints. bench/torch.ts spawns the scripts and parses that line.

Threads. torch.set_num_threads(N) sets ATen's OpenMP pool only. Debian's torch 1.13 does its fp32
GEMMs in OpenBLAS (the pthreads build), whose pool defaults to every core and does not listen to
torch: without openblas_set_num_threads(N) a "1-thread" run uses all cores for its matmuls. So
setup_threads() sets all three pools (OpenMP, inter-op = 1, OpenBLAS via ctypes) and settings()
reads them back into the JSON line.

Tuned settings (issue 3): tcmalloc by LD_PRELOAD and OMP_WAIT_POLICY=PASSIVE are process
environment, set by the caller (bench/torch.ts); settings() reports what this process really got
(tcmalloc found in /proc/self/maps, the variable's value), not what was asked for.

FLOP formulas (the same ones bench/torch.ts exports for the engine side; bench/README.md states
them). N_ne = parameters without the token embedding (the untied LM head counts); attention counts
the two T x T matmuls (QK^T, PV) at 2*D flops per key each, causal, so a training/prefill token sees
T/2 keys on average and a decode step at position p sees p+1:
  train         6*N_ne + 6*L*T*D                       (fwd 2N + 2LTD, bwd 4N + 4LTD)
  prefill       2*(N_ne - V*D) + 2*L*T*D + 2*V*D/T      (LM head for the last position only)
  decode        2*N_ne + 4*L*D*ctx, ctx = P + (S+1)/2   (S steps after a P-token prompt)
  stitch_*      stitch_train_flops / stitch_decode_flops below (walk of the placement).

Known limits: timing is wall clock (time.perf_counter) around whole steps; the statistic is the
median of the timed steps, which resists the noise of a shared machine but hides a bimodal one
(all_seconds keeps every step).
"""
import ctypes
import json
import os
import statistics
import sys
import time

import torch

from llama import block_params, param_counts


def _loaded_libs():
    try:
        with open('/proc/self/maps') as f:
            return {line.split()[-1] for line in f if '/' in line}
    except OSError:
        return set()


def _openblas():
    """ctypes handle of the OpenBLAS this torch loaded, or None (another BLAS, or not Linux)."""
    for path in _loaded_libs():
        if 'openblas' in os.path.basename(path):
            try:
                return ctypes.CDLL(path)
            except OSError:
                return None
    return None


def setup_threads(n: int):
    """N threads in every pool this torch computes with; 1 inter-op thread."""
    if n < 1:
        raise SystemExit(f'--threads must be >= 1, got {n}')
    torch.set_num_threads(n)
    torch.set_num_interop_threads(1)
    lib = _openblas()
    if lib is not None and hasattr(lib, 'openblas_set_num_threads'):
        lib.openblas_set_num_threads(ctypes.c_int(n))


def settings(extra=None):
    """What this run really had: allocator, OpenMP wait policy, the three thread pools, BLAS, ISA."""
    libs = _loaded_libs()
    tc = sorted(p for p in libs if 'tcmalloc' in os.path.basename(p))
    lib = _openblas()
    blas_threads = None
    if lib is not None and hasattr(lib, 'openblas_get_num_threads'):
        blas_threads = lib.openblas_get_num_threads()
    wait = os.environ.get('OMP_WAIT_POLICY')
    s = {
        'tuned': bool(tc) and (wait or '').upper() == 'PASSIVE',
        'malloc': 'tcmalloc' if tc else 'glibc',
        'ld_preload': os.environ.get('LD_PRELOAD') or None,
        'tcmalloc_note': os.environ.get('BTS_TORCH_TCMALLOC_NOTE') or None,
        'omp_wait_policy': wait or 'default',
        'torch_threads': torch.get_num_threads(),
        'interop_threads': torch.get_num_interop_threads(),
        'blas': 'openblas' if lib is not None else 'other',
        'blas_threads': blas_threads,
        'mkldnn': torch.backends.mkldnn.is_available(),
        'python': sys.version.split()[0],
    }
    try:
        s['cpu_capability'] = torch.backends.cpu.get_cpu_capability()  # torch >= 2.0
    except AttributeError:
        s['cpu_capability'] = _cpu_isa()
    if extra:
        s.update(extra)
    return {k: v for k, v in s.items() if v is not None}


def _cpu_isa():
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((l for l in f if l.startswith('flags')), '').split()
    except OSError:
        return 'unknown'
    for isa in ('avx512_bf16', 'avx512bw', 'avx512f', 'avx2'):
        if isa in flags:
            return isa
    return 'sse'


CPU_SECONDS = []   # process CPU seconds (all threads) of each timed call of the last time_steps()
WALL_SECONDS = []  # and their wall seconds


def time_steps(step, warmup: int, steps: int):
    """Runs step() warmup times untimed, then `steps` times; returns the wall seconds of each timed
    call (and leaves their process CPU seconds in CPU_SECONDS)."""
    for _ in range(warmup):
        step()
    out = []
    CPU_SECONDS.clear()
    WALL_SECONDS.clear()
    for _ in range(steps):
        c0 = time.process_time()
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
        CPU_SECONDS.append(time.process_time() - c0)
        WALL_SECONDS.append(out[-1])
    return out


def emit(result: dict, as_json: bool):
    """One JSON line on stdout (--json), else the same object indented."""
    if as_json:
        print(json.dumps(result, separators=(',', ':')), flush=True)
    else:
        print(json.dumps(result, indent=2), flush=True)


def make_result(mode, config, threads, tokens_per_step, seconds, flops_per_token, extra_settings=None,
                **fields):
    """The JSON object of one run: tokens/s and seconds per step from the median step."""
    med = statistics.median(seconds)
    tps = tokens_per_step / med
    # CPU seconds per wall second over the timed calls: close to `threads` on an idle machine, lower
    # when other processes take the cores (then the figure is not a clean anchor)
    busy = sum(CPU_SECONDS) / sum(WALL_SECONDS) if WALL_SECONDS and sum(WALL_SECONDS) > 0 else None
    r = {
        'impl': 'pytorch',
        'torch': torch.__version__,
        'mode': mode,
        'config': config,
        'threads': threads,
        'tokens_per_s': tps,
        'seconds_per_step': med,
        'steps': len(seconds),
        'flops_per_token': flops_per_token,
        'gflops': flops_per_token * tps / 1e9,
        'settings': settings(extra_settings),
        'statistic': 'median',
        'all_seconds': seconds,
        'cpu_per_wall': busy,
    }
    r.update(fields)
    return r


# ---------------------------------------------------------------------------------------------------
# FLOPs per token (see the header). c is a LlamaConfig.

def non_embedding_params(c):
    return param_counts(c)[1]


def train_flops(c):
    return 6 * non_embedding_params(c) + 6 * c.L * c.T * c.D


def prefill_flops(c, T):
    return 2 * (non_embedding_params(c) - c.V * c.D) + 2 * c.L * T * c.D + 2 * c.V * c.D / T


def decode_flops(c, prompt, new):
    ctx = prompt + (new + 1) / 2
    return 2 * non_embedding_params(c) + 4 * c.L * c.D * ctx


def stitch_params(c, n):
    """One stitch: n projections D x D and a gate D -> D*(n+1)."""
    return n * c.D * c.D + (n + 1) * c.D * c.D


def stitch_train_flops(c, n, placement):
    """FLOPs per token of one stitch-training step, hub + n frozen experts, walking the placement
    [(after_block 1..L, 'he'|'eh'), ...]. A stream needs gradients once it depends on stitch
    parameters (experts after any stitch; the hub after an E->H); frozen blocks on such a stream pay
    forward + input gradient (2*Nb + 2TD, then 2*Nb + 4TD), others forward only; a stitch pays its
    forward, its weight gradients (2 * params) and the input gradients of streams that need them; the
    hub's final norm + LM head pays forward and input gradient (no dW)."""
    M, D, T = n + 1, c.D, c.T
    Nb = block_params(c)
    at = dict(placement)
    needs = [False] * M
    f = 0.0
    for j in range(1, c.L + 1):
        for m in range(M):
            f += 2 * Nb + 2 * T * D
            if needs[m]:
                f += 2 * Nb + 4 * T * D
        kind = at.get(j)
        if kind is None:
            continue
        gate, proj = 2 * D * D * M, 2 * n * D * D
        f += gate + proj          # forward
        f += gate + proj          # weight gradients
        if kind == 'eh':
            f += sum(2 * D * D for m in range(1, M) if needs[m])    # dh_i through W_proj_i
            if needs[0]:
                f += gate                                            # dh_0 through the gate
            needs = [True] * M
        else:
            if needs[0]:
                f += gate + proj                                     # dh_0 through gate and projections
            needs = [needs[0]] + [True] * n
    f += 2 * c.V * c.D + (2 * c.V * c.D if needs[0] else 0)
    return f


def stitch_decode_flops(c, n, K, prompt, new):
    """FLOPs per generated token of a stitched decode step: every block of the n+1 models, K stitch
    forwards, the hub's LM head (the experts' heads are never used)."""
    M = n + 1
    ctx = prompt + (new + 1) / 2
    return M * c.L * (2 * block_params(c) + 4 * c.D * ctx) + K * 2 * stitch_params(c, n) + 2 * c.V * c.D
