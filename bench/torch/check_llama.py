#!/usr/bin/python3
"""Checks bench/torch/llama.py (the benchmark's nn.Module) against test/golden/make_golden.py (the
functional model the engine's golden files come from), so that the PyTorch anchor times the same
model the engine computes.

    /usr/bin/python3 bench/torch/check_llama.py

On make_golden.py's 'tiny-llama' variant (GQA with 2 query heads per kv head, B=2, T=9, random
weights loaded into the module) it compares: logits, the mean cross-entropy and the gradient of every
weight; KV-cached decode (prefill 5 tokens, then 3 one at a time, through the preallocated cache)
against the full forward; and, for stitch_bench.py's stitch layer, identity/zero init leaving the
hub (E->H: uniform mix of identical states) and the experts (H->E: half-way to the hub) where the
method says. Exits 1 with a message on the first mismatch. fp32, one thread: agreement to ~1e-6.
"""
import importlib.util
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no __pycache__ in the source tree
from llama import Llama, LlamaConfig, KVCache, load_golden_weights  # noqa: E402
from stitch_bench import Stitch, Stitched  # noqa: E402

torch.set_num_threads(1)


def load_make_golden():
    path = os.path.join(HERE, '..', '..', 'test', 'golden', 'make_golden.py')
    spec = importlib.util.spec_from_file_location('make_golden', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check(what, err, tol=1e-5):
    ok = err < tol
    print(f'{"ok  " if ok else "FAIL"} {what}: rel err {err:.2e} (tol {tol:.0e})')
    if not ok:
        sys.exit(1)


def main():
    mg = load_make_golden()
    gc = mg.VARIANTS['tiny-llama']
    c = LlamaConfig('golden', V=gc['vocab'], D=gc['D'], L=gc['L'], H=gc['H'], Hkv=gc['Hkv'], F=gc['F'],
                    T=gc['T'], B=gc['B'], theta=gc['theta'], eps=gc['eps'])
    assert c.Dh == gc['Dh']
    w = mg.init_weights(gc)
    model = load_golden_weights(Llama(c, max_pos=gc['max_pos']), w)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, c.V, (c.B, c.T), generator=g)
    targets = torch.roll(ids, -1, dims=1)

    # forward + loss + gradients against the functional golden model
    params = {k: v.clone().requires_grad_(True) for k, v in w.items()}
    ref_logits = mg.forward(gc, params, ids)
    ref_loss = torch.nn.functional.cross_entropy(ref_logits.reshape(-1, c.V), targets.reshape(-1))
    ref_loss.backward()
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, c.V), targets.reshape(-1))
    loss.backward()
    check('logits', rel_err(logits.detach(), ref_logits.detach()))
    check('loss', abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()))
    worst = 0.0
    for name, p in model.named_parameters():
        key = name if name == 'lm_head.weight' else 'model.' + name
        worst = max(worst, rel_err(p.grad, params[key].grad))
    check('gradients (worst weight)', worst)

    # KV-cached decode through the preallocated cache
    NP, ND = 5, 3
    with torch.inference_mode():
        full = model(ids[:1, :NP + ND])[0]                               # [NP+ND, V]
        cache = KVCache(c, 1, NP + ND)
        out = [model(ids[:1, :NP], cache, last_only=True)[0, -1]]
        for s in range(ND):
            out.append(model(ids[:1, NP + s:NP + s + 1], cache, last_only=True)[0, -1])
        cached = torch.stack(out)                                        # logits of NP-1 .. NP+ND-1
    check('KV-cached decode', rel_err(cached, full[NP - 1:NP + ND]))

    # stitch layer at init (identity projections, zero gate)
    D, n, N = 16, 3, 5
    hs = [torch.randn(2, N, D, generator=g) for _ in range(n + 1)]
    eh, he = Stitch(D, n, 'eh'), Stitch(D, n, 'he')
    out = eh(hs)
    check('E->H at init: hub = mean of the models', rel_err(out[0], sum(hs) / (n + 1)))
    check('E->H at init: experts projected (identity)', max(rel_err(out[i], hs[i]) for i in range(1, n + 1)))
    out = he(hs)
    check('H->E at init: hub unchanged', rel_err(out[0], hs[0]))
    check('H->E at init: experts half-way to the hub',
          max(rel_err(out[i], 0.5 * hs[i] + 0.5 * hs[0]) for i in range(1, n + 1)))
    # a non-trivial gate against the formula written out per model and per dim
    with torch.no_grad():
        eh.gate.normal_(0, 0.3, generator=g)
        eh.proj.add_(torch.randn(eh.proj.shape, generator=g) * 0.1)
        Gflat = hs[0] @ eh.gate.T                                        # [2, N, D*(n+1)]
        p = [hs[i] @ eh.proj[i - 1].T for i in range(1, n + 1)]
        want = torch.empty_like(hs[0])
        for d in range(D):  # model m at dim d is G[t, d*(n+1) + m] (lib/stitch/layout.ts)
            gd = torch.softmax(Gflat[..., d * (n + 1):(d + 1) * (n + 1)], dim=-1)
            want[..., d] = gd[..., 0] * hs[0][..., d] + sum(gd[..., i] * p[i - 1][..., d] for i in range(1, n + 1))
        check('E->H trained gate vs the formula', rel_err(eh(hs)[0], want))
        he.gate.copy_(eh.gate)
        he.proj.copy_(eh.proj)
        for d in range(D):
            gd = torch.sigmoid(Gflat[..., d * (n + 1):(d + 1) * (n + 1)])
            for i in range(1, n + 1):
                want_i = (1 - gd[..., i]) * hs[i][..., d] + gd[..., i] * (hs[0] @ he.proj[i - 1].T)[..., d]
                if rel_err(he(hs)[i][..., d], want_i) > 1e-5:
                    check(f'H->E trained gate vs the formula (expert {i}, dim {d})', 1.0)
        check('H->E trained gate vs the formula', 0.0)
    # stitch training step: the forward-only prefix (no_grad) and the frozen blocks give the same
    # stitch gradients as autograd over the whole graph; no model weight gets a gradient
    sc = LlamaConfig('stitch', V=37, D=16, L=4, H=4, Hkv=2, F=24, T=6, B=2)
    net = Stitched(sc, 2, 2, 'alternating', max_pos=16, seed=3)             # after 2 (he), 4 (eh)
    assert net.placement == [(2, 'he'), (4, 'eh')], net.placement
    with torch.no_grad():
        for st in net.stitches:  # away from init, so that every path carries gradient
            st.gate.normal_(0, 0.3, generator=g)
            st.proj.add_(torch.randn(st.proj.shape, generator=g) * 0.1)
    ids = torch.randint(0, sc.V, (sc.B, sc.T), generator=g)
    targets = torch.randint(0, sc.V, (sc.B, sc.T), generator=g)
    net.train_loss(ids, targets).backward()
    fast = [p.grad.clone() for p in net.stitches.parameters()]
    assert all(f.abs().max() > 0 for f in fast), 'a stitch tensor got a zero gradient'
    net.zero_grad(set_to_none=True)
    hs = net.run_blocks([m.embed_tokens(ids) for m in net.models], 0, sc.L, 0, None)
    ref = torch.nn.functional.cross_entropy(net.models[0].head(hs[0]).view(-1, sc.V), targets.view(-1))
    ref.backward()
    check('stitch training gradients vs full autograd',
          max(rel_err(a, p.grad) for a, p in zip(fast, net.stitches.parameters())))
    check('no gradient on frozen weights', float(any(p.grad is not None for p in net.models.parameters())))
    # stitched KV-cached decode against the stitched forward of the whole sequence
    with torch.inference_mode():
        seq = ids[:1]
        caches = [KVCache(sc, 1, sc.T) for _ in range(3)]
        inc = [net.step_tokens(seq[:, :3], caches)]
        inc += [net.step_tokens(seq[:, t:t + 1], caches) for t in range(3, sc.T)]
        whole = []
        for t in range(3, sc.T + 1):
            whole.append(net.step_tokens(seq[:, :t], [KVCache(sc, 1, sc.T) for _ in range(3)]))
        check('stitched KV-cached decode', rel_err(torch.cat(inc), torch.cat(whole)))
    print('all checks passed')


if __name__ == '__main__':
    main()
