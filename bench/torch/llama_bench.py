#!/usr/bin/python3
"""PyTorch 1.13 CPU anchor for the engine's training and inference benchmarks (issue 3).

    /usr/bin/python3 bench/torch/llama_bench.py --config a|b|tiny --threads N
        --mode train_fp32|train_bf16|prefill|decode [--steps S] [--warmup W] [--json]
        [--lr 1e-3] [--prompt 16] [--new 128] [--seed 0]

Prints one JSON object (one line with --json): impl, torch, mode, config, threads, tokens_per_s,
seconds_per_step (median over the S timed steps), steps, flops_per_token, gflops, settings (what the
process really had: allocator, OMP wait policy, thread pools), plus per mode:
- train_fp32: one step = forward of [B, T], mean next-token cross-entropy, backward, gradients
  clipped to global norm --clip (default 1, as the engine's trainer), AdamW step,
  zero_grad(set_to_none). tokens/s = B*T / step. `losses` (every step, warm-up included) and `loss`
  (after the last one). The same fixed batch every step, so the loss falls (a sanity check).
- train_bf16: the same under torch.autocast('cpu', dtype=torch.bfloat16): fp32 master weights, fp32
  AdamW, matmuls in bf16, logits upcast to fp32 for the loss. PyTorch's own CPU mixed precision.
- prefill: forward of [1, T] into a preallocated KV cache, LM head on the last position, under
  inference_mode; tokens/s = T / time. `batch` holds the same for [B, T] (tokens/s = B*T / time).
- decode: batch-1 greedy decode: a P-token prompt (prefill, untimed), then S_new single-token steps
  through the preallocated cache; tokens/s = S_new / time of those steps. One timed step = one whole
  generation; seconds_per_step is per generated token.
Weights N(0, 0.02^2) (norm gains 1), tokens uniform, both from --seed. AdamW: lr 1e-3, betas (0.9,
0.95), eps 1e-8, weight decay 0.1 on every tensor, foreach=True (the multi-tensor implementation,
faster than the default per-tensor loop on CPU in 1.13).

Known limits: on a CPU without AVX512-BF16/AVX512BW, torch 1.13 runs bf16 matmuls in a scalar loop
(tens of times slower than fp32); train_bf16 is then not PyTorch's fastest training and the anchor
for mixed-precision training should be the faster of the two train modes (bench/README.md).
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import llama  # noqa: E402
from llama import CONFIGS, KVCache, Llama, param_counts  # noqa: E402
from common import (decode_flops, emit, make_result, prefill_flops, setup_threads,  # noqa: E402
                    time_steps, train_flops)

MODES = ('train_fp32', 'train_bf16', 'prefill', 'decode')
DEFAULT_STEPS = {'train_fp32': (5, 2), 'train_bf16': (5, 2), 'prefill': (5, 1), 'decode': (3, 1)}


def make_optimizer(params, lr):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=True)


def bench_train(c, args, bf16):
    model = Llama(c, max_pos=c.T).init_random(args.seed)
    model.train()
    params = list(model.parameters())
    opt = make_optimizer(params, args.lr)
    g = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(0, c.V, (c.B, c.T + 1), generator=g)
    ids, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()   # [B, T] each
    losses = []

    def step():
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids)                                              # [B, T, V]
        loss = F.cross_entropy(logits.float().view(-1, c.V), targets.view(-1))
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    secs = time_steps(step, args.warmup, args.steps)
    extra = {'optimizer': 'AdamW(lr=%g, betas=(0.9,0.95), eps=1e-8, wd=0.1, foreach=True), clip %g'
                          % (args.lr, args.clip),
             'precision': 'autocast bf16 (fp32 master weights, fp32 AdamW)' if bf16 else 'fp32'}
    return make_result(args.mode, c.name, args.threads, c.B * c.T, secs, train_flops(c), extra,
                       loss=losses[-1] if losses else None, losses=losses, batch=c.B, seq=c.T,
                       params=param_counts(c)[0], params_non_embedding=param_counts(c)[1])


@torch.inference_mode()
def bench_prefill(c, args):
    model = Llama(c, max_pos=c.T).init_random(args.seed).eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, c.V, (c.B, c.T), generator=g)

    def run(B):
        cache = KVCache(c, B, c.T)

        def step():
            cache.reset()
            model(ids[:B], cache, last_only=True)
        return time_steps(step, args.warmup, args.steps)

    s1 = run(1)
    sb = run(c.B)
    rb = make_result(args.mode, c.name, args.threads, c.B * c.T, sb, prefill_flops(c, c.T))
    extra = {'logits': 'last position only', 'kv_cache': 'preallocated', 'grad': 'inference_mode'}
    return make_result(args.mode, c.name, args.threads, c.T, s1, prefill_flops(c, c.T), extra,
                       seq=c.T, params=param_counts(c)[0],
                       batch={'B': c.B, 'tokens_per_s': rb['tokens_per_s'],
                              'seconds_per_step': rb['seconds_per_step'], 'gflops': rb['gflops'],
                              'all_seconds': sb})


@torch.inference_mode()
def bench_decode(c, args):
    P, S = args.prompt, args.new
    model = Llama(c, max_pos=P + S).init_random(args.seed).eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, c.V, (1, P), generator=g)
    cache = KVCache(c, 1, P + S)
    generated = []

    def step():
        # one generation; the decode phase (not the prompt's prefill) is timed here
        cache.reset()
        tok = model(prompt, cache, last_only=True)[0, -1].argmax().view(1, 1)  # [1, 1]
        out = [tok.item()]
        t0 = time.perf_counter()
        for _ in range(S):
            tok = model(tok, cache, last_only=True)[0, -1].argmax().view(1, 1)
            out.append(tok.item())
        step.decode_seconds.append(time.perf_counter() - t0)
        generated[:] = out
    step.decode_seconds = []
    time_steps(step, args.warmup, args.steps)
    secs = step.decode_seconds[args.warmup:]
    per_token = [s / S for s in secs]  # seconds per generated token, one entry per generation
    extra = {'kv_cache': 'preallocated', 'grad': 'inference_mode', 'sampling': 'greedy',
             'logits': 'last position only', 'matvec': 'torch.mv' if llama.MATVEC else 'F.linear'}
    return make_result(args.mode, c.name, args.threads, 1, per_token, decode_flops(c, P, S), extra,
                       prompt=P, new_tokens=S, params=param_counts(c)[0], generated=generated[:16])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--config', choices=sorted(CONFIGS), required=True)
    ap.add_argument('--threads', type=int, required=True)
    ap.add_argument('--mode', choices=MODES, required=True)
    ap.add_argument('--steps', type=int, help='timed steps (train 5, prefill 5, decode 3; tiny 1)')
    ap.add_argument('--warmup', type=int, help='untimed steps first (train 2, prefill 1, decode 1)')
    ap.add_argument('--lr', type=float, default=1e-3)
    ap.add_argument('--clip', type=float, default=1.0, help='max global grad norm before AdamW (0: off)')
    ap.add_argument('--prompt', type=int, default=16, help='decode: prompt tokens (P)')
    ap.add_argument('--new', type=int, default=128, help='decode: timed single-token steps')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--matvec', choices=('on', 'off'), default='on',
                    help='batch-1 decode: single-row matmuls as torch.mv (on) or F.linear (off)')
    ap.add_argument('--json', action='store_true', help='one JSON line on stdout')
    args = ap.parse_args(argv)
    c = CONFIGS[args.config]
    ds, dw = DEFAULT_STEPS[args.mode]
    if args.config == 'tiny':
        ds, dw = 1, 1
    args.steps = ds if args.steps is None else args.steps
    args.warmup = dw if args.warmup is None else args.warmup
    if args.steps < 1 or args.warmup < 0 or args.prompt < 1 or args.new < 1:
        ap.error('--steps, --prompt, --new must be >= 1 and --warmup >= 0')
    setup_threads(args.threads)
    llama.MATVEC = args.matvec == 'on'
    torch.manual_seed(args.seed)
    if args.mode in ('train_fp32', 'train_bf16'):
        r = bench_train(c, args, args.mode == 'train_bf16')
    elif args.mode == 'prefill':
        r = bench_prefill(c, args)
    else:
        r = bench_decode(c, args)
    emit(r, args.json)


if __name__ == '__main__':
    main()
