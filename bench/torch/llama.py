"""The PyTorch Llama decoder that anchors the engine benchmarks (bench/train.ts, infer.ts, stitch.ts).

The model is test/golden/make_golden.py's (our own file), written again as an nn.Module so that a
training step is an ordinary PyTorch training step (Parameters, autograd, torch.optim.AdamW) and
decode has a KV cache. The arithmetic is the same, op for op: RMSNorm in fp32 (x * rsqrt(mean(x^2) +
eps) * w), RoPE with Hugging Face's rotate-half pairing, GQA by repeat_interleave of the kv heads
(query head h uses kv head h // (H / Hkv)), eager causal attention with the softmax in fp32, SwiGLU
MLP, untied LM head, no biases. bench/torch/check_llama.py checks this module against
make_golden.py's functional forward (logits, loss gradients, KV-cached decode).

Where PyTorch 1.13 offers a faster way to do the same arithmetic, the benchmark gets it (issue 3: the
anchor must not be a strawman): the RoPE cos/sin tables and the causal mask are built once, not per
call; GQA skips the repeat when Hkv = H; decode writes into a preallocated KV cache (no torch.cat)
and attends over a view of it; generation computes the LM head for the last position only; a
single-row matmul (batch-1 decode) calls torch.mv, about 2x faster than F.linear's M=1 sgemm in
Debian's OpenBLAS 0.3.21.
PyTorch 1.13 has no scaled_dot_product_attention and no torch.compile, so attention stays eager.

Shapes: B batch, T sequence, D hidden, F ffn, H heads, Hkv kv heads, Dh = D / H head dim, V vocab,
L layers. Activations [B, T, D]; Linear weights [out, in] as in Hugging Face (y = x W^T).

Known limits: plain RoPE only (no Llama 3 scaling: the benchmark configs do not use it); the cache
holds one sequence length for the whole batch (all rows at the same position).
"""
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LlamaConfig:
    """Sizes of one Llama decoder. Dh = D / H."""
    name: str
    V: int          # vocabulary
    D: int          # hidden width
    L: int          # blocks
    H: int          # query heads
    Hkv: int        # key/value heads (H % Hkv == 0)
    F: int          # SwiGLU inner width
    T: int          # training / prefill sequence length
    B: int          # training batch
    theta: float = 10000.0
    eps: float = 1e-5

    @property
    def Dh(self) -> int:
        return self.D // self.H

    def to_dict(self):
        return asdict(self)


# The benchmark configs (issues 3 and 4). bench/torch.ts carries the same table.
CONFIGS = {
    'a': LlamaConfig('a', V=4096, D=256, L=6, H=8, Hkv=8, F=688, T=256, B=16),
    'b': LlamaConfig('b', V=8192, D=512, L=8, H=8, Hkv=8, F=1376, T=512, B=8),
    # smoke test: every code path in well under a second
    'tiny': LlamaConfig('tiny', V=64, D=32, L=1, H=2, Hkv=2, F=64, T=8, B=2),
}


def block_params(c: LlamaConfig) -> int:
    """Weights of one block: q, k, v, o projections, gate/up/down, two norm gains."""
    return c.D * c.H * c.Dh * 2 + c.D * c.Hkv * c.Dh * 2 + 3 * c.D * c.F + 2 * c.D


def param_counts(c: LlamaConfig):
    """(total, non-embedding) parameter counts. Non-embedding = everything except the token embedding
    table (a lookup, no FLOPs); the untied LM head is a matmul and counts."""
    total = c.V * c.D + c.L * block_params(c) + c.D + c.V * c.D
    return total, total - c.V * c.D


# ---------------------------------------------------------------------------------------------------
# The model.

class RMSNorm(torch.nn.Module):
    def __init__(self, D, eps):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(D))
        self.eps = eps

    def forward(self, x):  # x [B, T, D]
        # LlamaRMSNorm: in fp32, then back to the input dtype (bf16 under autocast), times the gain.
        x32 = x.to(torch.float32)
        var = x32.pow(2).mean(-1, keepdim=True)
        return self.weight * (x32 * torch.rsqrt(var + self.eps)).to(x.dtype)


# Batch-1 decode: a single row times a weight goes to torch.mv (OpenBLAS sgemv). Debian's OpenBLAS
# 0.3.21 runs an M=1 sgemm (what F.linear calls) through its packing path, about 2x slower than sgemv
# on the benchmark's shapes; PyTorch's best here is the matrix-vector call. Set False to compare.
MATVEC = True


def linear(x, w):
    """y = x W^T for x [..., in], w [out, in]; one row without autograd -> torch.mv."""
    if MATVEC and x.numel() == x.shape[-1] and not torch.is_grad_enabled():
        return torch.mv(w, x.reshape(-1)).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Preallocated keys and values of every layer: k[l], v[l] are [B, Hkv, Tcap, Dh]. `pos` is the
    number of positions filled. Writes are in place (slice assignment), reads are views."""

    def __init__(self, c: LlamaConfig, B: int, Tcap: int, dtype=torch.float32):
        self.k = [torch.zeros(B, c.Hkv, Tcap, c.Dh, dtype=dtype) for _ in range(c.L)]
        self.v = [torch.zeros(B, c.Hkv, Tcap, c.Dh, dtype=dtype) for _ in range(c.L)]
        self.Tcap = Tcap
        self.pos = 0

    def reset(self):
        self.pos = 0


class Attention(torch.nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.c = c
        self.q_proj = torch.nn.Linear(c.D, c.H * c.Dh, bias=False)
        self.k_proj = torch.nn.Linear(c.D, c.Hkv * c.Dh, bias=False)
        self.v_proj = torch.nn.Linear(c.D, c.Hkv * c.Dh, bias=False)
        self.o_proj = torch.nn.Linear(c.H * c.Dh, c.D, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        """x [B, Tq, D] (normed); cos/sin [Tq, Dh] for the positions of x; mask [Tq, Tk] bool (True =
        hidden) or None. With `cache` (KVCache), k/v are written at cache.pos .. cache.pos+Tq-1 and
        the queries attend over cache positions 0 .. cache.pos+Tq-1 (the caller advances cache.pos)."""
        c = self.c
        B, Tq, _ = x.shape
        q = linear(x, self.q_proj.weight).view(B, Tq, c.H, c.Dh).transpose(1, 2)     # [B,H,Tq,Dh]
        k = linear(x, self.k_proj.weight).view(B, Tq, c.Hkv, c.Dh).transpose(1, 2)   # [B,Hkv,Tq,Dh]
        v = linear(x, self.v_proj.weight).view(B, Tq, c.Hkv, c.Dh).transpose(1, 2)
        if cos.dtype != q.dtype:  # bf16 under autocast (as transformers' apply_rotary_pos_emb)
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            p0, p1 = cache.pos, cache.pos + Tq
            cache.k[layer][:, :, p0:p1] = k
            cache.v[layer][:, :, p0:p1] = v
            k = cache.k[layer][:, :, :p1]                              # [B,Hkv,Tk,Dh] views
            v = cache.v[layer][:, :, :p1]
        G = c.H // c.Hkv
        if G > 1:  # repeat_kv: kv head j serves query heads j*G .. j*G+G-1
            k = k.repeat_interleave(G, dim=1)                          # [B,H,Tk,Dh]
            v = v.repeat_interleave(G, dim=1)
        scores = (q @ k.transpose(2, 3)) * (1.0 / math.sqrt(c.Dh))     # [B,H,Tq,Tk]
        if mask is not None:
            scores = scores.masked_fill(mask, float('-inf'))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        o = (probs @ v).transpose(1, 2).reshape(B, Tq, c.H * c.Dh)     # [B,Tq,H*Dh]
        return linear(o, self.o_proj.weight)


class MLP(torch.nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = torch.nn.Linear(c.D, c.F, bias=False)
        self.up_proj = torch.nn.Linear(c.D, c.F, bias=False)
        self.down_proj = torch.nn.Linear(c.F, c.D, bias=False)

    def forward(self, x):  # x [B, T, D]
        return linear(F.silu(linear(x, self.gate_proj.weight)) * linear(x, self.up_proj.weight),
                      self.down_proj.weight)


class Block(torch.nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.D, c.eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.D, c.eps)
        self.mlp = MLP(c)

    def forward(self, h, cos, sin, mask, cache=None, layer=0):  # h [B, T, D] residual stream
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


class Llama(torch.nn.Module):
    """Llama decoder. Submodule names follow Hugging Face's LlamaForCausalLM (embed_tokens,
    layers.{i}.self_attn.q_proj, ..., norm, lm_head), so state_dict keys map one to one."""

    def __init__(self, c: LlamaConfig, max_pos: int):
        super().__init__()
        self.c = c
        self.embed_tokens = torch.nn.Embedding(c.V, c.D)
        self.layers = torch.nn.ModuleList(Block(c) for _ in range(c.L))
        self.norm = RMSNorm(c.D, c.eps)
        self.lm_head = torch.nn.Linear(c.D, c.V, bias=False)
        # RoPE tables for positions 0 .. max_pos-1 (transformers' LlamaRotaryEmbedding, fp32):
        # freqs = pos x inv_freq, emb = cat(freqs, freqs) [max_pos, Dh]
        inv_freq = 1.0 / (c.theta ** (torch.arange(0, c.Dh, 2, dtype=torch.int64).float() / c.Dh))
        freqs = torch.arange(max_pos).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer('cos', emb.cos(), persistent=False)
        self.register_buffer('sin', emb.sin(), persistent=False)
        # causal mask of the longest query block: True where key position > query position
        self.register_buffer('causal', torch.ones(max_pos, max_pos, dtype=torch.bool).triu(1),
                             persistent=False)
        self.max_pos = max_pos

    def init_random(self, seed: int, std: float = 0.02):
        """Benchmark init: every matrix N(0, std^2) from a seeded generator, norm gains 1."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith('layernorm.weight') or name == 'norm.weight':
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def rope(self, start: int, T: int):
        """cos, sin [T, Dh] for positions start .. start+T-1."""
        if start + T > self.max_pos:
            raise ValueError(f'positions up to {start + T} exceed max_pos {self.max_pos}')
        return self.cos[start:start + T], self.sin[start:start + T]

    def mask(self, start: int, Tq: int):
        """[Tq, start+Tq] causal mask for queries at start .. start+Tq-1, or None for one query."""
        if Tq == 1:
            return None
        return self.causal[start:start + Tq, :start + Tq]

    def blocks(self, h, lo, hi, start=0, cache=None):
        """Runs blocks lo .. hi-1 on the residual stream h [B, T, D] at positions start .. (does not
        advance the cache)."""
        T = h.shape[1]
        cos, sin = self.rope(start, T)
        mask = self.mask(start, T)
        for i in range(lo, hi):
            h = self.layers[i](h, cos, sin, mask, cache, i)
        return h

    def head(self, h):  # h [B, T, D] -> logits [B, T, V]
        return linear(self.norm(h), self.lm_head.weight)

    def forward(self, ids, cache=None, last_only=False):
        """Logits of ids [B, T]: [B, T, V], or [B, 1, V] with last_only. With a cache the tokens sit at
        positions cache.pos .. cache.pos+T-1 and the cache advances by T."""
        start = 0 if cache is None else cache.pos
        h = self.blocks(self.embed_tokens(ids), 0, self.c.L, start, cache)
        if cache is not None:
            cache.pos += ids.shape[1]
        if last_only:
            h = h[:, -1:]
        return self.head(h)


def load_golden_weights(model: Llama, w: dict):
    """Copies make_golden.py's weight dict (HF names, 'model.' prefix) into the module."""
    sd = {}
    for name, t in w.items():
        sd[name[len('model.'):] if name.startswith('model.') else name] = t
    model.load_state_dict(sd, strict=True)
    return model
