"""
A LLaMA-style GPT in one file: the backbone every language-model idea in nanopapers plugs into.

    x_0      = Embedding(idx)
    x_{l+1}' = x_l + Attention(RMSNorm(x_l))          attention over RoPE-rotated queries and keys
    x_{l+1}  = x_{l+1}' + FFN(RMSNorm(x_{l+1}'))       FFN(x) = W2 (silu(W1 x) * W3 x)   (SwiGLU)
    logits   = W_out RMSNorm(x_L)

RMSNorm:  y = x / sqrt(mean(x^2) + eps) * g
RoPE:     each pair (x_{2i}, x_{2i+1}) of a head at position p is rotated by the angle p * base^(-2i/d)

The seams that later papers use, each a single place in this file:
  - the FFN of a block (`Block.ffn`): any module mapping x -> (y, aux), where aux is a dict of auxiliary
    losses / statistics that GPT.forward hands back to the caller (dense SwiGLU returns an empty dict);
  - the attention score function (`attend`): softmax through F.scaled_dot_product_attention, or
    Self-Adjust Softmax (sa_softmax.py) with `attn_score="sa" | "sa_norm"`;
  - the attention mask (`GPT.forward(..., attn_mask=...)`): causal when None, else a boolean (B, T, S)
    mask (True = may attend) or a sparse pattern (sepllm.SparsePattern), or one such per layer;
  - the KV cache (`KVCache`): it stores keys BEFORE RoPE and tells the model which positions to rotate
    queries and keys with, so a cache that evicts tokens (SepCache, SinkCache) can re-number what it keeps.

Choices: no biases anywhere; weights ~ N(0, init_std) with the residual output projections scaled by
1/sqrt(2 n_layer) (GPT-2's rule); the SwiGLU hidden size defaults to 8/3 d rounded up to a multiple of 64
so that the FFN has the parameters of a 4d GELU MLP.

Train it:  python train_lm.py
"""
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.attention import sepllm_attention
from sa_softmax import sa_attention
from sepllm import SparsePattern


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 256          # training context length
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0             # grouped-query attention (n_head a multiple of it); 0 = n_head
    n_embd: int = 128
    ffn_hidden: int = 0            # 0 = round_up(8/3 * n_embd, 64)
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    dropout: float = 0.0
    attn_score: str = "softmax"    # softmax (SDPA) | sa | sa_norm (Self-Adjust Softmax, sa_softmax.py)

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head size n_embd/n_head={self.n_embd // self.n_head} must be even for RoPE")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if min(self.vocab_size, self.block_size, self.n_layer, self.n_embd) < 1:
            raise ValueError("vocab_size, block_size, n_layer and n_embd must all be >= 1")
        if self.attn_score not in ("softmax", "sa", "sa_norm"):
            raise ValueError(f"attn_score={self.attn_score!r} must be softmax, sa or sa_norm")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # y = x / sqrt(mean(x^2) + eps) * g, in fp32 so bf16 activations do not lose the mean (one fused op)
        return F.rms_norm(x.float(), x.shape[-1:], self.weight.float(), self.eps).type_as(x)


def rope_angles(pos, head_dim, base):
    """The rotations of RoPE as unit complex numbers e^{i p theta_j}, theta_j = base^(-2j/D): (T, D/2) for
    positions pos (T,). Computed once per forward and shared by every layer's queries and keys."""
    theta = base ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)  # (D/2,)
    angle = pos.to(torch.float32)[:, None] * theta[None, :]                                           # (T, D/2)
    return torch.polar(torch.ones_like(angle), angle)


def rope(x, rotations):
    """Rotate each pair (x_{2j}, x_{2j+1}) of x (B, H, T, D) by its angle: read as the complex number
    x_{2j} + i x_{2j+1}, the rotation is one product with e^{i p theta_j} (rotations from rope_angles)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))                   # (B, H, T, D/2) complex
    return torch.view_as_real(pairs * rotations).flatten(-2).type_as(x)                 # (B, H, T, D)


class KVCache:
    """The full KV cache: keeps every past key and value.

    The model talks to a cache through two calls, so other caches (SepCache, SinkCache) can implement them:
      start(idx)            once per forward, before the layers, with the new token ids (B, T). Returns
                            (q_pos (T,), k_pos (S,), mask (B or 1, T, S) bool, True = may attend), where S is the
                            cache length once the new tokens are in. A cache may evict here.
      update(layer, k, v)   k, v: (B, H_kv, T, D), keys NOT yet rotated. Returns all cached (k, v) of that layer,
                            (B, H_kv, S, D), still unrotated; the model rotates keys with k_pos.
    Storing keys before RoPE costs one rotation of the cache per step, and lets an evicting cache give its
    keys positions 0..S-1 inside the cache, which keeps positions within what the model was trained on.
    """

    def __init__(self, n_layer):
        self.k = [None] * n_layer
        self.v = [None] * n_layer

    def __len__(self):
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def start(self, idx):
        past = len(self)
        S = past + idx.shape[1]
        q_pos = torch.arange(past, S, device=idx.device)
        k_pos = torch.arange(S, device=idx.device)
        mask = (k_pos[None, :] <= q_pos[:, None])[None]                                    # (1, T, S)
        return q_pos, k_pos, mask

    def update(self, layer, k, v):
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


def attend(q, k, v, mask, score="softmax", dropout_p=0.0):
    """Scaled dot-product attention; q (B, H, T, D), k, v (B, H, S, D).

    mask None means causal (T == S); a boolean (B or 1, T, S) mask, True = may attend; or a SparsePattern
    (sepllm.py), computed by kernels/attention.py without materialising the mask.
    score: softmax through SDPA (fused where the backend has a kernel), or SA-Softmax (sa, sa_norm), eager.
    """
    if isinstance(mask, SparsePattern):  # SepLLM / StreamingLLM rule: a sparse kernel, no (T, T) mask
        if dropout_p > 0:
            raise ValueError("attention dropout is not supported with sparse attention patterns; use dropout=0")
        return sepllm_attention(q, k, v, mask.keep, mask.n_init, mask.n_local, score)
    if score != "softmax":
        return sa_attention(q, k, v, mask, normalized=score == "sa_norm", dropout_p=dropout_p)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], dropout_p=dropout_p)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.dropout = cfg.dropout
        self.score = cfg.attn_score
        # W_q, W_k, W_v stacked into one matrix: one matmul instead of three, split right after
        self.qkv_sizes = [cfg.n_head * self.head_dim] + [cfg.n_kv_head * self.head_dim] * 2
        self.wqkv = nn.Linear(cfg.n_embd, sum(self.qkv_sizes), bias=False)
        self.wo = nn.Linear(cfg.n_head * self.head_dim, cfg.n_embd, bias=False)

    def forward(self, x, q_rot, k_rot, mask, cache=None, layer=0):
        """q_rot, k_rot: RoPE rotations (rope_angles) of the query and key positions."""
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split(self.qkv_sizes, dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)               # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)            # (B, H_kv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)                                        # (B, H_kv, S, D)
        q, k = rope(q, q_rot), rope(k, k_rot)
        if self.n_kv_head != self.n_head:
            # grouped-query attention: each group of n_head / n_kv_head query heads shares one key/value head
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)           # (B, H, S, D)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = attend(q, k, v, mask, self.score, self.dropout if self.training else 0.0)          # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def ffn_hidden_size(cfg: GPTConfig):
    return cfg.ffn_hidden or 64 * math.ceil(8 * cfg.n_embd / 3 / 64)


class SwiGLU(nn.Module):
    """The dense FFN. Returns (y, aux) like every FFN that plugs into a Block; dense has no auxiliary loss."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = ffn_hidden_size(cfg)
        self.w13 = nn.Linear(cfg.n_embd, 2 * hidden, bias=False)   # W1 and W3 stacked: one matmul for both
        self.w2 = nn.Linear(hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        W1x, W3x = self.w13(x).chunk(2, dim=-1)
        # FFN(x) = W2 (silu(W1 x) * W3 x)
        return self.w2(F.silu(W1x) * W3x), {}


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int, ffn: Optional[nn.Module] = None):
        super().__init__()
        self.layer = layer
        self.attn_norm, self.ffn_norm = RMSNorm(cfg.n_embd), RMSNorm(cfg.n_embd)
        self.attn = Attention(cfg)
        self.ffn = ffn if ffn is not None else SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, q_rot, k_rot, mask, cache=None):
        x = x + self.drop(self.attn(self.attn_norm(x), q_rot, k_rot, mask, cache, self.layer))
        h, aux = self.ffn(self.ffn_norm(x))
        return x + self.drop(h), aux


class GPTOutput(NamedTuple):
    logits: torch.Tensor            # (B, T, vocab_size)
    loss: Optional[torch.Tensor]    # mean cross-entropy over targets != -1, or None without targets
    aux: dict                       # per-layer auxiliary outputs of the FFNs: {"name": [layer0, layer1, ...]}


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, ffns: Optional[list] = None):
        """ffns: optional list of n_layer FFN modules (a later paper's MoE layers); default dense SwiGLU."""
        super().__init__()
        self.config = cfg
        if ffns is not None and len(ffns) != cfg.n_layer:
            raise ValueError(f"got {len(ffns)} FFN modules for n_layer={cfg.n_layer}")
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, l, ffns[l] if ffns else None) for l in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("attn.wo.weight", "ffn.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, attn_mask=None, cache=None):
        """idx (B, T) token ids. attn_mask: None (causal), a bool (B or 1, T, T) mask, or a list of n_layer masks.
        cache: a KVCache-like object; it then decides positions and the mask, and attn_mask must be None."""
        B, T = idx.shape
        if cache is not None:
            if attn_mask is not None:
                raise ValueError("pass either a cache (which builds its own mask) or attn_mask, not both")
            q_pos, k_pos, attn_mask = cache.start(idx)
        else:
            q_pos = k_pos = torch.arange(T, device=idx.device)
        head_dim = self.config.n_embd // self.config.n_head
        q_rot = rope_angles(q_pos, head_dim, self.config.rope_base)                  # (T, D/2)
        k_rot = q_rot if k_pos is q_pos else rope_angles(k_pos, head_dim, self.config.rope_base)
        masks = attn_mask if isinstance(attn_mask, list) else [attn_mask] * len(self.blocks)
        x = self.drop(self.tok_emb(idx))                                            # (B, T, C)
        aux = {}
        for block, mask in zip(self.blocks, masks):
            x, block_aux = block(x, q_rot, k_rot, mask, cache)
            for name, value in block_aux.items():
                aux.setdefault(name, []).append(value)
        logits = self.lm_head(self.norm(x))                                         # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=-1)
        return GPTOutput(logits, loss, aux)

    def optimizer_groups(self, weight_decay):
        """AdamW groups: decay matrices (linear and embedding weights), not the norm gains."""
        params = {id(p): p for p in self.parameters() if p.requires_grad}.values()
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, cache=None, generator=None):
        """Continue idx (B, T) by max_new_tokens tokens with a KV cache (a fresh full KVCache by default).

        temperature 0 is greedy decoding. The full cache does not crop the context: past block_size the model
        sees positions it was never trained on; an evicting cache (SepCache, SinkCache) keeps them bounded."""
        cache = cache if cache is not None else KVCache(len(self.blocks))
        logits = self(idx, cache=cache).logits[:, -1]
        out = [idx]
        for step in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits.float() / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            out.append(nxt)
            if step + 1 < max_new_tokens:
                logits = self(nxt, cache=cache).logits[:, -1]
        return torch.cat(out, dim=1)
