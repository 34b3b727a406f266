#!/usr/bin/python3
"""Golden files for test/golden/stitch.test.ts: a tiny stitched model (hub + 2 experts) in plain PyTorch.

Run with Debian's Python and torch (the python3 first on PATH may be another one, without torch):

    apt-get install -y python3-torch      # torch 1.13 on Debian 12
    /usr/bin/python3 test/golden/make_stitch_golden.py

An INDEPENDENT implementation of the stitched forward pass of docs/FORMAT.md and ../shared/METHOD.md,
written the PyTorch way (the gate logits `.view(B, T, D, n+1)`, `softmax(dim=-1)`, `sigmoid`), with
the Llama blocks of make_golden.py (imported: its RMSNorm, RoPE, GQA attention and SwiGLU are the
ones already checked by llama.test.ts). Autograd gives the gradients of the stitch tensors, the only
leaves; the three models are frozen, float32.

Writes test/golden/data/:
  tiny-stitch/            hub/, expert-0/, expert-1/: HF checkpoints (config.json, model.safetensors);
                          experts = the hub's weights plus seeded perturbations.
                          K = 2 alternating: H->E after block 2, E->H after block 4; expertStream
                          "projected", hubBias 0; stitch weights random.
  tiny-stitch-alleh/      the same three models (paths ../tiny-stitch/...), K = 2 both E->H (after
                          blocks 2 and 4), expertStream "unchanged", hubBias 1.5.
  tiny-stitch-k3/         the same models, K = 3 alternating (E->H, H->E, E->H after blocks 1, 2, 4),
                          expertStream "projected", hubBias 0.8.
  tiny-stitch-k4/         the same models, K = 4 alternating (H->E, E->H, H->E, E->H after blocks
                          1..4), expertStream "unchanged", hubBias 0.5.
  (The last two reach backward paths that the first two cannot; see CASES.) Stitch weights are
  random and differ per case.
Each case folder holds stitch.json (the manifest), stitches.safetensors (F32) and golden.safetensors:
  input_ids [B,T] I32, targets [B,T] I32 (next tokens, some -100), logits [B,T,V] F32 (the hub's),
  loss [] F32 (mean CE over counted targets), grad.<stitch tensor name> F32 for every stitch tensor.
Deterministic (fixed seeds, one thread): re-running rewrites identical files on the same torch build.
Before writing, it asserts two properties of its own stitched model: with experts equal to the hub and
identity projections, any gates give exactly the hub's logits (both stitch types, both expert streams);
and G's reshape puts model m of dim d at column d*(n+1) + m.
"""
import hashlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_golden as mg  # noqa: E402  (sets one thread and fp32 as default dtype)

DATA = mg.DATA

# Model shapes: like tiny-llama, with 4 blocks (so stitches sit after block 2 and after the last one,
# with frozen blocks between them in every model) and a different V and T.
CONFIG = dict(vocab=61, D=32, L=4, H=4, Hkv=2, Dh=8, F=48, theta=10000.0, eps=1e-5, B=2, T=7,
              max_pos=64, scaling=None, seed=4242)
N_EXPERTS = 2
EXPERT_NAMES = [f'expert-{e}' for e in range(N_EXPERTS)]

CASES = {
    # the case: both stitch types, K = 2 as the placement rule makes it for L = 4, the
    # package's default expert stream. Its first stitch is the H->E one and its only E->H the last, so
    # neither the input gradients of an H->E stitch nor an expert-stream gradient entering an E->H
    # stitch from above is ever needed: the last two cases exercise those.
    'tiny-stitch': dict(stitches=[(2, 'he'), (4, 'eh')], expertStream='projected', hubBias=0.0,
                        seed=777, models='.'),
    # the "all E->H" ablation with the other expert stream and a hub-preserving bias. No stitch writes
    # an expert stream here, so the experts need no backward at all.
    'tiny-stitch-alleh': dict(stitches=[(2, 'eh'), (4, 'eh')], expertStream='unchanged', hubBias=1.5,
                              seed=778, models='../tiny-stitch'),
    # K = 3 alternating (E->H, H->E, E->H after blocks 1, 2, 4), projected stream, hub bias on both
    # gate types: input gradients through an H->E stitch, and projected expert streams of the first
    # E->H that carry a gradient of their own from above.
    'tiny-stitch-k3': dict(stitches=[(1, 'eh'), (2, 'he'), (4, 'eh')], expertStream='projected',
                           hubBias=0.8, seed=779, models='../tiny-stitch'),
    # K = 4 alternating (H->E, E->H, H->E, E->H after blocks 1..4), unchanged stream: the E->H after
    # block 2 passes the expert gradient from above through to the H->E below it.
    'tiny-stitch-k4': dict(stitches=[(1, 'he'), (2, 'eh'), (3, 'he'), (4, 'eh')],
                           expertStream='unchanged', hubBias=0.5, seed=780, models='../tiny-stitch'),
}


# ---------------------------------------------------------------------------------------------------
# Models.

def expert_weights(hub, seed):
    """An 'expert': the hub's weights plus seeded perturbations (embeddings std 0.3, Linear weights
    0.1 = half their init std, norm gains 0.1), so that every tensor of every model differs."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in hub.items():
        if name == 'model.embed_tokens.weight':
            s = 0.3
        else:
            s = 0.1
        out[name] = w + s * torch.randn(w.shape, generator=g)
    return out


def block(c, w, i, h, cos, sin):
    """Decoder block i (0-based) of the Llama of make_golden.py: pre-norm attention and MLP with
    residuals. h [B, T, D]."""
    p = f'model.layers.{i}'
    a = mg.rms_norm(h, w[f'{p}.input_layernorm.weight'], c['eps'])
    h = h + mg.attention(c, w, p, a, cos, sin)
    m = mg.rms_norm(h, w[f'{p}.post_attention_layernorm.weight'], c['eps'])
    return h + mg.mlp(w, p, m)


# ---------------------------------------------------------------------------------------------------
# The stitched model.

def stitch_names(k, n):
    return [f'stitch.{k}.proj.{e}.weight' for e in range(n)] + [f'stitch.{k}.gate.weight']


def random_stitches(c, case, n):
    """Random stitch weights (neither identity nor zero, so that the goldens depend on every entry):
    projections N(0, 1/D) (norm-preserving on average), gates N(0, 0.25/D): with hub states of rms
    about 3 the logits have std 1.4 .. 1.9, so the gates span most of (0, 1) without being uniform."""
    D, M = c['D'], n + 1
    g = torch.Generator().manual_seed(case['seed'])
    t = {}
    for k, _ in enumerate(case['stitches']):
        for e in range(n):
            t[f'stitch.{k}.proj.{e}.weight'] = torch.randn(D, D, generator=g) / D ** 0.5
        t[f'stitch.{k}.gate.weight'] = 0.5 * torch.randn(D * M, D, generator=g) / D ** 0.5
    return t


def stitched_logits(c, hub, experts, st, stitches, expert_stream, hub_bias, ids):
    """Hub logits [B, T, V] of the stitched model on ids [B, T] (positions 0..T-1).

    hub, experts: weight dicts; st: stitch tensors by name; stitches: [(afterBlock, type)], afterBlock
    1-based. Every model embeds the same ids with its own table and runs its own blocks; after block j
    the stitch at j (if any) replaces the n+1 residual streams. The hub's stream after block L goes
    through the hub's final norm and LM head.
    """
    n = len(experts)
    M = n + 1
    B, T = ids.shape
    D = c['D']
    cos, sin = mg.rope_cos_sin(c, torch.arange(T))
    models = [hub] + experts
    hs = [w['model.embed_tokens.weight'][ids] for w in models]  # n+1 x [B, T, D]
    at = {j: (k, ty) for k, (j, ty) in enumerate(stitches)}
    for j in range(1, c['L'] + 1):
        hs = [block(c, w, j - 1, h, cos, sin) for w, h in zip(models, hs)]
        if j not in at:
            continue
        k, ty = at[j]
        h0 = hs[0]
        W_gate = st[f'stitch.{k}.gate.weight']                                # [D*M, D]
        W_proj = [st[f'stitch.{k}.proj.{e}.weight'] for e in range(n)]       # n x [D, D]
        G = torch.nn.functional.linear(h0, W_gate).view(B, T, D, M)          # [B, T, D, M]
        if ty == 'eh':
            bias = torch.zeros(M)
            bias[0] = hub_bias                                                # favours the hub
            g = torch.softmax(G + bias, dim=-1)                               # over models, per dim
            p = [torch.nn.functional.linear(hs[e + 1], W_proj[e]) for e in range(n)]
            new_h0 = g[..., 0] * h0
            for e in range(n):
                new_h0 = new_h0 + g[..., e + 1] * p[e]
            hs = [new_h0] + (p if expert_stream == 'projected' else hs[1:])
        elif ty == 'he':
            g = torch.sigmoid(G - hub_bias)                                   # slot 0 unused
            new = [h0]
            for e in range(n):
                q = torch.nn.functional.linear(h0, W_proj[e])
                new.append((1 - g[..., e + 1]) * hs[e + 1] + g[..., e + 1] * q)
            hs = new
        else:
            raise ValueError(ty)
    h = mg.rms_norm(hs[0], hub['model.norm.weight'], c['eps'])
    return torch.nn.functional.linear(h, hub['lm_head.weight'])


def self_checks(c, hub, ids):
    """Properties the implementation must have, checked before any file is written."""
    n, D, M = N_EXPERTS, c['D'], N_EXPERTS + 1
    # 1) The gate reshape: column d*M + m of G (row of W_gate) is model m at dim d.
    h0 = torch.randn(3, D)
    W = torch.randn(D * M, D)
    G = torch.nn.functional.linear(h0, W).view(3, D, M)
    for (d, m) in [(0, 0), (0, 2), (5, 1), (D - 1, 2)]:
        assert torch.allclose(G[:, d, m], h0 @ W[d * M + m]), 'gate reshape'
    # 2) Experts equal to the hub, identity projections: every stitch is the identity on the streams
    # (E->H: weights summing to 1 over equal states; H->E: a mix of equal states), whatever the gates.
    plain = mg.forward(c, hub, ids)
    same = [dict(hub) for _ in range(n)]
    for stitches in ([(2, 'he'), (4, 'eh')], [(1, 'eh'), (3, 'he'), (4, 'eh')]):
        for stream in ('projected', 'unchanged'):
            st = {}
            for k in range(len(stitches)):
                for e in range(n):
                    st[f'stitch.{k}.proj.{e}.weight'] = torch.eye(D)
                st[f'stitch.{k}.gate.weight'] = torch.randn(D * M, D)
            got = stitched_logits(c, hub, same, st, stitches, stream, 0.7, ids)
            err = (got - plain).abs().max().item() / plain.abs().max().item()
            assert err < 1e-5, f'identity stitches change the hub: {err}'


# ---------------------------------------------------------------------------------------------------
# Files.

def weights_sha256(model_dir):
    """The manifest hash of a checkpoint (docs/FORMAT.md): SHA-256 of the bytes of its safetensors
    weight files concatenated in sorted file-name order (here a single model.safetensors)."""
    index = os.path.join(model_dir, 'model.safetensors.index.json')
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)['weight_map'].values()), key=lambda s: s.encode('utf-8'))
    else:
        files = ['model.safetensors']
    h = hashlib.sha256()
    for name in files:
        with open(os.path.join(model_dir, name), 'rb') as f:
            h.update(f.read())
    return h.hexdigest()


def write_model(model_dir, c, w):
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, 'config.json'), 'w') as f:
        json.dump(mg.hf_config(c), f, indent=2)
        f.write('\n')
    mg.write_safetensors(os.path.join(model_dir, 'model.safetensors'), w)


def main():
    print(f'torch {torch.__version__}', file=sys.stderr)
    c = CONFIG
    n = N_EXPERTS
    hub = mg.init_weights(c)
    experts = [expert_weights(hub, c['seed'] + 100 + e) for e in range(n)]

    g = torch.Generator().manual_seed(c['seed'] + 1)
    B, T, V = c['B'], c['T'], c['vocab']
    ids = torch.randint(0, V, (B, T), generator=g, dtype=torch.int64)
    targets = torch.full((B, T), -100, dtype=torch.int64)
    targets[:, :-1] = ids[:, 1:]
    targets[0, 2] = -100
    targets[1, 4] = -100

    self_checks(c, hub, ids)

    base = os.path.join(DATA, 'tiny-stitch')
    write_model(os.path.join(base, 'hub'), c, hub)
    for name, w in zip(EXPERT_NAMES, experts):
        write_model(os.path.join(base, name), c, w)
    sha = {m: weights_sha256(os.path.join(base, m)) for m in ['hub'] + EXPERT_NAMES}

    for case_name, case in CASES.items():
        out = os.path.join(DATA, case_name)
        os.makedirs(out, exist_ok=True)
        st = random_stitches(c, case, n)
        params = {k: v.clone().requires_grad_(True) for k, v in st.items()}
        logits = stitched_logits(c, hub, experts, params, case['stitches'], case['expertStream'],
                                 case['hubBias'], ids)
        loss = torch.nn.functional.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T),
                                                 ignore_index=-100, reduction='mean')
        loss.backward()
        for name, p in params.items():
            assert p.grad is not None and p.grad.abs().max() > 0, f'{case_name}: no gradient for {name}'

        prefix = '' if case['models'] == '.' else case['models'] + '/'
        manifest = {
            'format': 'bts-stitch',
            'version': 1,
            'hub': {'path': prefix + 'hub', 'sha256': sha['hub']},
            'experts': [{'name': m, 'path': prefix + m, 'sha256': sha[m]} for m in EXPERT_NAMES],
            'stitches': [{'afterBlock': j, 'type': ty} for j, ty in case['stitches']],
            'expertStream': case['expertStream'],
            'hubBias': case['hubBias'],
            'gateDropout': 0,
            'init': 'random',
            'dModel': c['D'],
            'numExperts': n,
        }
        with open(os.path.join(out, 'stitch.json'), 'w') as f:
            json.dump(manifest, f, indent=2)
            f.write('\n')
        ordered = {}
        for k in range(len(case['stitches'])):
            for name in stitch_names(k, n):
                ordered[name] = st[name]
        mg.write_safetensors(os.path.join(out, 'stitches.safetensors'), ordered)
        gold = {
            'input_ids': ids.to(torch.int32),
            'targets': targets.to(torch.int32),
            'logits': logits.detach(),
            'loss': loss.detach(),
        }
        for name in ordered:
            gold['grad.' + name] = params[name].grad
        mg.write_safetensors(os.path.join(out, 'golden.safetensors'), gold)
        gmax = max(p.grad.abs().max().item() for p in params.values())
        print(f'{case_name}: loss {loss.item():.6f}, max|logit| {logits.abs().max().item():.3f}, '
              f'max|grad| {gmax:.3e}')


if __name__ == '__main__':
    main()
