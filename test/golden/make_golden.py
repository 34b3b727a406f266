#!/usr/bin/python3
"""Golden files for test/golden/llama.test.ts: a tiny random Llama decoder in plain PyTorch.

Run with Debian's Python and torch (the python3 first on PATH may be another one, without torch):

    apt-get install -y python3-torch      # torch 1.13 on Debian 12
    /usr/bin/python3 test/golden/make_golden.py

This is an INDEPENDENT implementation (no transformers, no safetensors package), written after
transformers' modeling_llama.py (LlamaRMSNorm, LlamaRotaryEmbedding + rotate_half, repeat_kv,
eager attention, LlamaMLP, LlamaForCausalLM) and its `_compute_llama3_parameters`. Everything is
float32 (torch's default dtype), because the engine computes in float32: the goldens carry torch's
fp32 rounding, and the test tolerances are set for fp32.

Writes, for every variant, test/golden/data/<name>/:
  config.json          HF-style Llama config (model_type llama, rope_scaling, tie_word_embeddings false)
  model.safetensors    the random weights under their HF names (F32)
  golden.safetensors   input_ids [B,T] I32, targets [B,T] I32 (next tokens, some -100), logits
                       [B,T,V] F32, loss [] F32 (mean CE over counted targets), grad.<weight name> F32
                       for every weight, decode_ids [NP+ND] I32 (row 0's first tokens), decode_logits
                       [ND,V] F32 (logits of tokens NP..NP+ND-1 fed one at a time after a prefill of NP).
The output is deterministic (fixed seeds, one thread); re-running rewrites identical files on the same
torch build (other builds may differ in the last bits, far inside the test tolerances).
"""
import json
import math
import os
import struct
import sys

import torch

torch.set_num_threads(1)
torch.set_default_dtype(torch.float32)

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, 'data')

# ---------------------------------------------------------------------------------------------------
# Variants. Shapes are tiny on purpose (the committed files stay small) but exercise what matters:
# GQA with 2 query heads per kv head, B = 2 (batch strides), odd V and T, F not a multiple of 16,
# ignored targets, two layers (so gradients flow through a whole block into the one below).
BASE = dict(vocab=67, D=32, L=2, H=4, Hkv=2, Dh=8, F=48, theta=10000.0, eps=1e-5, B=2, T=9,
            max_pos=64, scaling=None)
VARIANTS = {
    # plain RoPE (Llama 2 style)
    'tiny-llama': dict(BASE, seed=1234),
    # Llama 3 RoPE scaling with theta 500000 and Dh 8: inv_freq = 500000^(-i/4) =
    # [1, 3.76e-2, 1.41e-3, 5.32e-5], wavelengths 2*pi/inv_freq = [6.3, 167, 4.4e3, 1.2e5].
    # original_max_position_embeddings 256 gives high_freq_wavelen 256/4 = 64 and low_freq_wavelen
    # 256/1 = 256: frequency 0 is unchanged (6.3 < 64), frequency 1 is blended (64 <= 167 <= 256),
    # frequencies 2 and 3 are divided by 8 (> 256). All three branches of the formula are used.
    'tiny-llama3-rope': dict(BASE, seed=98765, theta=500000.0, max_pos=2048,
                             scaling=dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=256)),
}
DECODE_PREFILL = 5  # tokens of row 0 fed as one prefill
DECODE_STEPS = 3    # then this many tokens one at a time with a KV cache


# ---------------------------------------------------------------------------------------------------
# The model (plain PyTorch, float32).

def weight_names(c):
    names = ['model.embed_tokens.weight']
    for i in range(c['L']):
        p = f'model.layers.{i}'
        names += [f'{p}.input_layernorm.weight', f'{p}.self_attn.q_proj.weight',
                  f'{p}.self_attn.k_proj.weight', f'{p}.self_attn.v_proj.weight',
                  f'{p}.self_attn.o_proj.weight', f'{p}.post_attention_layernorm.weight',
                  f'{p}.mlp.gate_proj.weight', f'{p}.mlp.up_proj.weight', f'{p}.mlp.down_proj.weight']
    return names + ['model.norm.weight', 'lm_head.weight']


def init_weights(c):
    """Random weights, normal with std chosen so that activations stay O(1)."""
    g = torch.Generator().manual_seed(c['seed'])
    V, D, H, Hkv, Dh, F = c['vocab'], c['D'], c['H'], c['Hkv'], c['Dh'], c['F']
    shapes = {'model.embed_tokens.weight': ([V, D], 1.0), 'model.norm.weight': ([D], None),
              'lm_head.weight': ([V, D], 0.2)}
    for i in range(c['L']):
        p = f'model.layers.{i}'
        shapes.update({
            f'{p}.input_layernorm.weight': ([D], None),
            f'{p}.self_attn.q_proj.weight': ([H * Dh, D], 0.2),
            f'{p}.self_attn.k_proj.weight': ([Hkv * Dh, D], 0.2),
            f'{p}.self_attn.v_proj.weight': ([Hkv * Dh, D], 0.2),
            f'{p}.self_attn.o_proj.weight': ([D, H * Dh], 0.2),
            f'{p}.post_attention_layernorm.weight': ([D], None),
            f'{p}.mlp.gate_proj.weight': ([F, D], 0.2),
            f'{p}.mlp.up_proj.weight': ([F, D], 0.2),
            f'{p}.mlp.down_proj.weight': ([D, F], 0.2),
        })
    w = {}
    for name in weight_names(c):
        shape, std = shapes[name]
        if std is None:  # norm gains: around 1, not exactly 1 (so that dW of the norms matters)
            w[name] = 1.0 + 0.2 * torch.randn(shape, generator=g)
        else:
            w[name] = std * torch.randn(shape, generator=g)
    return w


def rms_norm(x, w, eps):
    # LlamaRMSNorm: in fp32, x * rsqrt(mean(x^2) + eps), then times the weight.
    x32 = x.to(torch.float32)
    var = x32.pow(2).mean(-1, keepdim=True)
    return w * (x32 * torch.rsqrt(var + eps)).to(x.dtype)


def inv_freq_of(c):
    """transformers' _compute_default_rope_parameters / _compute_llama3_parameters, in fp32."""
    Dh = c['Dh']
    inv_freq = 1.0 / (c['theta'] ** (torch.arange(0, Dh, 2, dtype=torch.int64).float() / Dh))
    s = c['scaling']
    if s is None:
        return inv_freq
    factor, low, high = s['factor'], s['low_freq_factor'], s['high_freq_factor']
    old_ctx = s['original_max_position_embeddings']
    low_freq_wavelen = old_ctx / low
    high_freq_wavelen = old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def rope_cos_sin(c, positions):
    # LlamaRotaryEmbedding.forward: freqs = pos (fp32) x inv_freq (fp32), emb = cat(freqs, freqs).
    inv_freq = inv_freq_of(c)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, Dh/2]
    emb = torch.cat((freqs, freqs), dim=-1)                 # [T, Dh]
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # x [B, heads, T, Dh]; cos/sin [T, Dh]
    return x * cos[None, None] + rotate_half(x) * sin[None, None]


def attention(c, w, p, x, cos, sin, cache=None):
    """One self-attention sublayer. x [B, Tq, D] (already normed). With `cache` (a dict holding k, v
    [B, Hkv, Tpast, Dh] or empty), the new keys/values are appended and the queries are the last Tq
    positions of the cached sequence (the KV-cached path)."""
    B, Tq, _ = x.shape
    H, Hkv, Dh = c['H'], c['Hkv'], c['Dh']
    q = (x @ w[f'{p}.self_attn.q_proj.weight'].T).view(B, Tq, H, Dh).transpose(1, 2)    # [B,H,Tq,Dh]
    k = (x @ w[f'{p}.self_attn.k_proj.weight'].T).view(B, Tq, Hkv, Dh).transpose(1, 2)  # [B,Hkv,Tq,Dh]
    v = (x @ w[f'{p}.self_attn.v_proj.weight'].T).view(B, Tq, Hkv, Dh).transpose(1, 2)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    if cache is not None:
        if 'k' in cache:
            k = torch.cat((cache['k'], k), dim=2)
            v = torch.cat((cache['v'], v), dim=2)
        cache['k'], cache['v'] = k, v
    Tk = k.shape[2]
    # GQA (repeat_kv): kv head j serves query heads j*G .. j*G+G-1, i.e. query head h uses h // G.
    G = H // Hkv
    k = k.repeat_interleave(G, dim=1)  # [B,H,Tk,Dh]
    v = v.repeat_interleave(G, dim=1)
    scores = (q @ k.transpose(2, 3)) / math.sqrt(Dh)  # [B,H,Tq,Tk]
    # causal: query i sits at position Tk - Tq + i and sees keys 0 ..= Tk - Tq + i
    qpos = torch.arange(Tk - Tq, Tk)[:, None]
    kpos = torch.arange(Tk)[None, :]
    scores = scores.masked_fill(kpos > qpos, float('-inf'))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    o = (probs @ v).transpose(1, 2).reshape(B, Tq, H * Dh)  # [B,Tq,H*Dh]
    return o @ w[f'{p}.self_attn.o_proj.weight'].T


def mlp(w, p, x):
    gate = x @ w[f'{p}.mlp.gate_proj.weight'].T
    up = x @ w[f'{p}.mlp.up_proj.weight'].T
    return (torch.nn.functional.silu(gate) * up) @ w[f'{p}.mlp.down_proj.weight'].T


def forward(c, w, ids, start=0, caches=None):
    """Logits [B, T, V] of ids [B, T] at positions start..start+T-1 (caches: one dict per layer)."""
    T = ids.shape[1]
    cos, sin = rope_cos_sin(c, torch.arange(start, start + T))
    h = w['model.embed_tokens.weight'][ids]  # [B,T,D] (an index, as nn.Embedding)
    for i in range(c['L']):
        p = f'model.layers.{i}'
        a = rms_norm(h, w[f'{p}.input_layernorm.weight'], c['eps'])
        h = h + attention(c, w, p, a, cos, sin, None if caches is None else caches[i])
        m = rms_norm(h, w[f'{p}.post_attention_layernorm.weight'], c['eps'])
        h = h + mlp(w, p, m)
    h = rms_norm(h, w['model.norm.weight'], c['eps'])
    return h @ w['lm_head.weight'].T


# ---------------------------------------------------------------------------------------------------
# Files.

def write_safetensors(path, tensors):
    """Minimal safetensors writer: u64 LE header length, JSON header (padded with spaces to a multiple
    of 8), then the raw little-endian bytes of each tensor, contiguous, in the given order."""
    dt = {torch.float32: 'F32', torch.int32: 'I32'}
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous()
        raw = t.numpy().astype(t.numpy().dtype.newbyteorder('<'), copy=False).tobytes()  # little-endian
        header[name] = {'dtype': dt[t.dtype], 'shape': list(t.shape), 'data_offsets': [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(',', ':')).encode('utf-8')
    h += b' ' * ((8 - len(h) % 8) % 8)
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def hf_config(c):
    cfg = {
        'architectures': ['LlamaForCausalLM'],
        'model_type': 'llama',
        'hidden_act': 'silu',
        'hidden_size': c['D'],
        'intermediate_size': c['F'],
        'num_hidden_layers': c['L'],
        'num_attention_heads': c['H'],
        'num_key_value_heads': c['Hkv'],
        'head_dim': c['Dh'],
        'vocab_size': c['vocab'],
        'rms_norm_eps': c['eps'],
        'rope_theta': c['theta'],
        'rope_scaling': c['scaling'],
        'max_position_embeddings': c['max_pos'],
        'tie_word_embeddings': False,
        'attention_bias': False,
        'mlp_bias': False,
        'bos_token_id': 1,
        'eos_token_id': 2,
        'torch_dtype': 'float32',
    }
    return cfg


def make(name, c):
    out = os.path.join(DATA, name)
    os.makedirs(out, exist_ok=True)
    w = init_weights(c)
    g = torch.Generator().manual_seed(c['seed'] + 1)
    B, T, V = c['B'], c['T'], c['vocab']
    ids = torch.randint(0, V, (B, T), generator=g, dtype=torch.int64)
    # next-token targets; the last position has none; two more positions are ignored
    targets = torch.full((B, T), -100, dtype=torch.int64)
    targets[:, :-1] = ids[:, 1:]
    targets[0, 3] = -100
    targets[1, 0] = -100

    params = {k: v.clone().requires_grad_(True) for k, v in w.items()}
    logits = forward(c, params, ids)  # [B,T,V]
    loss = torch.nn.functional.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T),
                                             ignore_index=-100, reduction='mean')
    loss.backward()

    # KV-cached decode of row 0: prefill NP tokens, then ND tokens one at a time. The golden is the
    # plain model on the growing prefix (last position's logits); the cached computation must agree.
    NP, ND = DECODE_PREFILL, DECODE_STEPS
    dec_ids = ids[0:1, : NP + ND]
    with torch.no_grad():
        golden_dec = torch.stack([forward(c, w, dec_ids[:, : NP + s + 1])[0, -1] for s in range(ND)])
        caches = [{} for _ in range(c['L'])]
        forward(c, w, dec_ids[:, :NP], 0, caches)
        cached = torch.stack([forward(c, w, dec_ids[:, NP + s: NP + s + 1], NP + s, caches)[0, -1]
                              for s in range(ND)])
    dec_err = (cached - golden_dec).abs().max().item() / golden_dec.abs().max().item()
    assert dec_err < 1e-5, f'{name}: KV-cached decode differs from the growing prefix by {dec_err}'
    fwd_err = (golden_dec - logits.detach()[0, NP: NP + ND]).abs().max().item() / golden_dec.abs().max().item()
    assert fwd_err < 1e-5, f'{name}: decode logits differ from the full forward by {fwd_err}'

    with open(os.path.join(out, 'config.json'), 'w') as f:
        json.dump(hf_config(c), f, indent=2)
        f.write('\n')
    write_safetensors(os.path.join(out, 'model.safetensors'), w)
    gold = {
        'input_ids': ids.to(torch.int32),
        'targets': targets.to(torch.int32),
        'logits': logits.detach(),
        'loss': loss.detach(),
        'decode_ids': dec_ids[0].to(torch.int32),
        'decode_logits': golden_dec,
    }
    for k in weight_names(c):
        gold['grad.' + k] = params[k].grad
    write_safetensors(os.path.join(out, 'golden.safetensors'), gold)
    print(f'{name}: loss {loss.item():.6f}, max|logit| {logits.abs().max().item():.3f}, '
          f'inv_freq {inv_freq_of(c).tolist()}, cached-decode rel err {dec_err:.2e}')


def main():
    print(f'torch {torch.__version__}', file=sys.stderr)
    for name, c in VARIANTS.items():
        make(name, c)


if __name__ == '__main__':
    main()
