#!/usr/bin/python3
"""PyTorch 1.13 CPU anchor for the engine's stitch benchmark (issue 4; ../shared/METHOD.md "The stitch
layer", "Placement", "What training needs").

    /usr/bin/python3 bench/torch/stitch_bench.py --config a|b|tiny --threads N
        --mode stitch_train|stitch_decode [--experts 3] [--stitches 2] [--pattern alternating|all-eh]
        [--steps S] [--warmup W] [--json] [--lr 1e-3] [--prompt 16] [--new 128] [--seed 0]

A hub and n experts (default 3), each a bench/torch/llama.py decoder of the config, all frozen
(requires_grad False), and K stitches (default 2) at the package's default placement: stitch k
(1-based) after block floor(k*L/K), types alternating backwards from the last, which is E->H (L=6,
K=2: after blocks 3 and 6 = H->E, E->H), as lib/stitch/layout.ts's stitchPlacement. One stitch: n
projections W_proj [n, D, D] and a gate W_gate [D*(n+1), D], no bias, identity / zero init; the gate
logits of one token reshape to [D, n+1], model fastest (lib/stitch/layout.ts).
  E->H: g = softmax over models of G = W_gate h_0; p_i = W_proj_i h_i; h_0' = g_0 h_0 + sum g_i p_i;
        h_i' = p_i (the literal reading, the package default).
  H->E: g = sigmoid(W_gate h_0) (slot 0 unused); h_0' = h_0; h_i' = (1 - g_i) h_i + g_i W_proj_i h_0.

Modes (the JSON line of llama_bench.py, tokens counted once per position, not once per model):
- stitch_train: B x T = config's (16 x 256 for a). Embeddings and the blocks before the first stitch
  run under torch.no_grad for all models; from the first stitch on, autograd goes through the frozen
  blocks (input gradients only: no weight requires grad, and streams that do not depend on a stitch,
  e.g. the hub between an H->E and the next E->H, build no graph at all); loss = mean next-token
  cross-entropy of the hub's LM head; gradients clipped to global norm --clip (default 1); AdamW
  (lr 1e-3, betas (0.9, 0.95), wd 0.1, foreach) on the stitch parameters only; zero_grad(set_to_none).
  fp32.
- stitch_decode: batch 1, each model its own preallocated KV cache; a P-token prompt (untimed), then S
  greedy steps from the hub's logits, every model fed the same token. tokens/s = S / decode time.
The models run one after another inside each block (the way one writes it in PyTorch); PyTorch has
no grouped GEMM of n+1 different weight sets short of stacking them into a bmm, which this anchor
does for the stitch projections but not for the blocks.

Known limits: fp32 only (see llama_bench.py on bf16 in torch 1.13 on AVX2); no gate dropout.
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
from llama import CONFIGS, KVCache, Llama, linear, param_counts  # noqa: E402
from common import (emit, make_result, setup_threads, stitch_decode_flops,  # noqa: E402
                    stitch_params, stitch_train_flops, time_steps)

MODES = ('stitch_train', 'stitch_decode')
DEFAULT_STEPS = {'stitch_train': (5, 2), 'stitch_decode': (3, 1)}


def stitch_placement(L, K, pattern='alternating'):
    """[(after_block 1..L, 'he'|'eh')]: stitch k after block floor(k*L/K), last one E->H."""
    if not 1 <= K <= L:
        raise SystemExit(f'--stitches must be in 1..L={L}, got {K}')
    return [((k * L) // K, 'eh' if pattern == 'all-eh' or (K - k) % 2 == 0 else 'he')
            for k in range(1, K + 1)]


class Stitch(torch.nn.Module):
    """One stitch layer between a hub (model 0) and n experts. proj [n, D, D] (proj[e] is expert e's
    W_proj in [out, in] layout), gate [D*(n+1), D]. Identity / zero init."""

    def __init__(self, D, n, kind):
        super().__init__()
        assert kind in ('eh', 'he')
        self.D, self.n, self.kind = D, n, kind
        self.proj = torch.nn.Parameter(torch.eye(D).repeat(n, 1, 1))
        self.gate = torch.nn.Parameter(torch.zeros(D * (n + 1), D))

    def forward(self, hs):
        """hs: n+1 streams [B, T, D], hub first. Returns the n+1 new streams."""
        h0 = hs[0]
        B, T, D = h0.shape
        n, M = self.n, self.n + 1
        G = linear(h0, self.gate).view(B, T, D, M)                      # [B,T,D,M] model fastest
        if self.kind == 'eh':
            g = torch.softmax(G, dim=-1)
            X = torch.stack(hs[1:]).view(n, B * T, D)                       # [n,N,D]
            P = torch.bmm(X, self.proj.transpose(1, 2)).view(n, B, T, D)   # p_i = h_i W_i^T
            mix = g[..., 0] * h0 + (g[..., 1:].permute(3, 0, 1, 2) * P).sum(0)
            return [mix] + list(P.unbind(0))
        g = torch.sigmoid(G)
        P = torch.matmul(h0.reshape(1, B * T, D), self.proj.transpose(1, 2)).view(n, B, T, D)
        return [h0] + [(1 - g[..., i]) * hs[i] + g[..., i] * P[i - 1] for i in range(1, M)]


class Stitched(torch.nn.Module):
    """Hub + experts (frozen Llama modules) and the K stitches (the only parameters)."""

    def __init__(self, c, n, K, pattern, max_pos, seed):
        super().__init__()
        self.c, self.n = c, n
        self.placement = stitch_placement(c.L, K, pattern)
        self.models = torch.nn.ModuleList(Llama(c, max_pos).init_random(seed + 101 * m) for m in range(n + 1))
        for p in self.models.parameters():
            p.requires_grad_(False)
        self.stitches = torch.nn.ModuleList(Stitch(c.D, n, kind) for _, kind in self.placement)
        self.at = {after: k for k, (after, _) in enumerate(self.placement)}

    def run_blocks(self, hs, lo, hi, start, caches, stitch=True):
        """Blocks lo..hi-1 (0-based) of every model on streams hs [B, T, D] at positions start..,
        each followed by its stitch where there is one (unless stitch=False)."""
        T = hs[0].shape[1]
        m0 = self.models[0]
        cos, sin = m0.rope(start, T)
        mask = m0.mask(start, T)
        for j in range(lo, hi):
            hs = [m.layers[j](h, cos, sin, mask, None if caches is None else caches[i], j)
                  for i, (m, h) in enumerate(zip(self.models, hs))]
            k = self.at.get(j + 1)
            if stitch and k is not None:
                hs = self.stitches[k](hs)
        return hs

    def train_loss(self, ids, targets):
        c = self.c
        first = self.placement[0][0]
        with torch.no_grad():  # embeddings and the blocks before the first stitch: forward only
            hs = [m.embed_tokens(ids) for m in self.models]
            hs = self.run_blocks(hs, 0, first, 0, None, stitch=False)
        hs = self.stitches[0](hs)
        hs = self.run_blocks(hs, first, c.L, 0, None)
        logits = self.models[0].head(hs[0])                                # [B,T,V]
        return F.cross_entropy(logits.view(-1, c.V), targets.reshape(-1))

    def step_tokens(self, ids, caches):
        """Logits [1, V] of the hub's last position; the caches advance by ids.shape[1]."""
        start = caches[0].pos
        hs = [m.embed_tokens(ids) for m in self.models]
        hs = self.run_blocks(hs, 0, self.c.L, start, caches)
        for cache in caches:
            cache.pos += ids.shape[1]
        return self.models[0].head(hs[0][:, -1:])[:, -1]


def bench_train(c, args, net):
    params = list(net.stitches.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1, foreach=True)
    g = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(0, c.V, (c.B, c.T + 1), generator=g)
    ids, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    losses = []

    def step():
        loss = net.train_loss(ids, targets)
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    secs = time_steps(step, args.warmup, args.steps)
    return make_result(args.mode, c.name, args.threads, c.B * c.T, secs,
                       stitch_train_flops(c, net.n, net.placement), base_extra(args),
                       loss=losses[-1], losses=losses, batch=c.B, seq=c.T, **shape_fields(c, net))


@torch.inference_mode()
def bench_decode(c, args, net):
    P, S = args.prompt, args.new
    M = net.n + 1
    caches = [KVCache(c, 1, P + S) for _ in range(M)]
    g = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, c.V, (1, P), generator=g)
    generated = []

    def step():
        for cache in caches:
            cache.reset()
        tok = net.step_tokens(prompt, caches).argmax(-1).view(1, 1)
        out = [tok.item()]
        t0 = time.perf_counter()
        for _ in range(S):
            tok = net.step_tokens(tok, caches).argmax(-1).view(1, 1)
            out.append(tok.item())
        step.decode_seconds.append(time.perf_counter() - t0)
        generated[:] = out
    step.decode_seconds = []
    time_steps(step, args.warmup, args.steps)
    per_token = [s / S for s in step.decode_seconds[args.warmup:]]
    extra = dict(base_extra(args), kv_cache='preallocated, one per model', grad='inference_mode',
                 sampling='greedy (hub logits)', matvec='torch.mv' if llama.MATVEC else 'F.linear')
    return make_result(args.mode, c.name, args.threads, 1, per_token,
                       stitch_decode_flops(c, net.n, len(net.placement), P, S), extra,
                       prompt=P, new_tokens=S, generated=generated[:16], **shape_fields(c, net))


def base_extra(args):
    return {'optimizer': 'AdamW(lr=%g, betas=(0.9,0.95), eps=1e-8, wd=0.1, foreach=True), clip %g, stitch params only'
            % (args.lr, args.clip), 'precision': 'fp32', 'models': 'sequential per block'}


def shape_fields(c, net):
    return {'experts': net.n, 'stitches': [{'after_block': a, 'type': t} for a, t in net.placement],
            'params_per_model': param_counts(c)[0],
            'stitch_params': len(net.placement) * stitch_params(c, net.n)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--config', choices=sorted(CONFIGS), required=True)
    ap.add_argument('--threads', type=int, required=True)
    ap.add_argument('--mode', choices=MODES, required=True)
    ap.add_argument('--experts', type=int, default=3, help='n experts (besides the hub)')
    ap.add_argument('--stitches', type=int, help='K stitches (default 2, or L if L < 2)')
    ap.add_argument('--pattern', choices=('alternating', 'all-eh'), default='alternating')
    ap.add_argument('--steps', type=int, help='timed steps (train 5, decode 3; tiny 1)')
    ap.add_argument('--warmup', type=int, help='untimed steps first (train 2, decode 1)')
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
    args.stitches = min(2, c.L) if args.stitches is None else args.stitches
    args.steps = ds if args.steps is None else args.steps
    args.warmup = dw if args.warmup is None else args.warmup
    if args.steps < 1 or args.warmup < 0 or args.prompt < 1 or args.new < 1 or args.experts < 1:
        ap.error('--steps, --prompt, --new, --experts must be >= 1 and --warmup >= 0')
    setup_threads(args.threads)
    llama.MATVEC = args.matvec == 'on'
    torch.manual_seed(args.seed)
    max_pos = max(c.T, args.prompt + args.new)
    net = Stitched(c, args.experts, args.stitches, args.pattern, max_pos, args.seed)
    if args.mode == 'stitch_train':
        r = bench_train(c, args, net)
    else:
        r = bench_decode(c, args, net)
    emit(r, args.json)


if __name__ == '__main__':
    main()
