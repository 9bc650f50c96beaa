"""P: the DALL·E 2 diffusion prior, text -> CLIP image embedding ``y_e``.

A causal (decoder-only) transformer reads one sequence per sample,

    [ text tokens x̂ (projected CLIP hidden states) ... | e_x | timestep | noised y_t | learned query ]

and the output at the final query token is the prediction (the clean ``y_e`` under the x0 objective, as in
DALL·E 2; any objective works since it is just a ``[B, D]`` regression). The causal mask lets every position see
all the conditioning before it, and nothing later in the sequence leaks back into the text positions.

Classifier-free guidance: ``drop_cond`` replaces ``e_x`` by a learned null embedding and masks out all text tokens
(``text_null="learned"``); with ``text_null="none"`` (Karlo) the caller runs the unconditional branch on the CLIP
encoding of the empty prompt instead.

The token order, positions and blocks are those of diffusers' ``PriorTransformer`` (Karlo's prior), so that with
``qkv_bias=True, text_null="none", embed_stats=True`` its weights load one to one (``lightning_mav.karlo.prior``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lightning_mav.nn.embeddings import TimestepEmbedding
from lightning_mav.nn.mixed_precision import attention

NUM_EXTRA_TOKENS = 4  # e_x, timestep, y_t, query


class Block(nn.Module):
    """Pre-LayerNorm transformer block: masked self-attention and an MLP (exact GELU), both residual.

    ``qkv_bias``: a bias on the fused q/k/v projection (diffusers' ``attention_bias=True``, as in Karlo's prior).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 qkv_bias: bool = False) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * heads * dim_head, bias=qkv_bias)
        self.proj = nn.Linear(heads * dim_head, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        """x ``[B, N, dim]``; allowed ``[B, 1, N, N]`` bool (True = query may attend to key)."""
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = attention(q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, -1))
        return x + self.mlp(self.norm2(x))


class Prior(nn.Module):
    """The diffusion prior P.

    Args:
        embed_dim: D, the CLIP embedding size of ``e_x`` and ``y_e``.
        text_width: W, the width of the CLIP text hidden states.
        max_text_len: the longest token sequence L accepted (the CLIP context length).
        dim, depth, heads, dim_head, mlp_ratio, dropout: the transformer.
        qkv_bias: a bias on the blocks' q/k/v projection (Karlo: True).
        text_null: ``"learned"``: ``drop_cond`` swaps in a learned null ``e_x`` and masks all text tokens;
            ``"none"`` (Karlo): no null parameter and no ``drop_cond``; the unconditional branch is the caller's
            encoding of the empty prompt ``""``.
        embed_stats: hold the CLIP image-embedding statistics ``clip_mean``/``clip_std`` ``[D]`` (frozen
            parameters, as diffusers' are parameters). The network then works on normalised embeddings
            ``(y - mean) / std``: the sampler's output goes through :meth:`unnormalize`, training targets through
            :meth:`normalize`. Without them both are the identity.
    """

    def __init__(
        self,
        embed_dim: int,
        text_width: int,
        max_text_len: int = 77,
        dim: int = 256,
        depth: int = 4,
        heads: int = 4,
        dim_head: int = 64,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        qkv_bias: bool = False,
        text_null: Literal["learned", "none"] = "learned",
        embed_stats: bool = False,
    ) -> None:
        super().__init__()
        if text_null not in ("learned", "none"):
            raise ValueError(f"text_null must be 'learned' or 'none', got {text_null!r}")
        self.dim, self.max_text_len, self.text_null, self.embed_stats = dim, max_text_len, text_null, embed_stats
        self.text_in = nn.Linear(text_width, dim)
        self.text_embed_in = nn.Linear(embed_dim, dim)
        if text_null == "learned":
            self.null_text_embed = nn.Parameter(torch.randn(dim) * 0.02)
        self.time_embed = TimestepEmbedding(dim, dim)
        self.image_in = nn.Linear(embed_dim, dim)
        self.query = nn.Parameter(torch.randn(dim) * 0.02)
        # Text positions 0..L-1 and the four fixed tokens after them, so shorter contexts keep the same positions
        # for e_x/t/y_t/query.
        self.pos_text = nn.Parameter(torch.randn(max_text_len, dim) * 0.01)
        self.pos_extra = nn.Parameter(torch.randn(NUM_EXTRA_TOKENS, dim) * 0.01)
        self.blocks = nn.ModuleList(Block(dim, heads, dim_head, mlp_ratio, dropout, qkv_bias) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, embed_dim)
        if embed_stats:  # statistics of the data, not trained: frozen, but parameters so that checkpoints keep them
            self.clip_mean = nn.Parameter(torch.zeros(embed_dim), requires_grad=False)
            self.clip_std = nn.Parameter(torch.ones(embed_dim), requires_grad=False)

    def normalize(self, y: Tensor) -> Tensor:
        """CLIP image embedding ``[B, D]`` -> the network's space ``(y - mean) / std`` (identity without stats)."""
        if not self.embed_stats:
            return y
        return (y - self.clip_mean.to(y)) / self.clip_std.to(y)

    def unnormalize(self, y: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`: ``y·std + mean`` ``[B, D]`` (diffusers' ``post_process_latents``)."""
        if not self.embed_stats:
            return y
        return y * self.clip_std.to(y) + self.clip_mean.to(y)

    def forward(
        self,
        y_t: Tensor,
        t: Tensor,
        *,
        text_embed: Tensor,
        text_hidden: Tensor,
        text_mask: Tensor,
        drop_cond: Tensor | None = None,
    ) -> Tensor:
        """Predict from the noised image embedding.

        Args:
            y_t: noised image embedding ``[B, D]``.
            t: diffusion timesteps ``[B]`` (int or float).
            text_embed: ``e_x [B, D]``.
            text_hidden: CLIP text hidden states ``[B, L, W]`` (L <= max_text_len).
            text_mask: ``[B, L]`` bool, True for real tokens.
            drop_cond: ``[B]`` bool; True -> unconditional (null e_x, no text tokens). Only with
                ``text_null="learned"``.
        Returns:
            the prediction ``[B, D]`` (the clean ``y_e`` under the x0 objective).
        """
        b, length = text_hidden.shape[:2]
        if length > self.max_text_len:
            raise ValueError(f"text has {length} tokens, the prior accepts at most {self.max_text_len}")
        text_mask = text_mask.bool()
        e_x = self.text_embed_in(text_embed)
        if drop_cond is not None and self.text_null == "none":
            raise ValueError("drop_cond needs text_null='learned'; with 'none' pass the empty prompt's encoding")
        if drop_cond is not None:
            drop = drop_cond.to(device=y_t.device, dtype=torch.bool)
            text_mask = text_mask & ~drop[:, None]
            e_x = torch.where(drop[:, None], self.null_text_embed.to(e_x), e_x)

        time = self.time_embed(t).to(e_x)
        extra = torch.stack([e_x, time, self.image_in(y_t), self.query.to(e_x).expand(b, -1)], dim=1)
        x = torch.cat([self.text_in(text_hidden) + self.pos_text[:length], extra + self.pos_extra], dim=1)

        # Causal mask, minus masked text keys. Every token may still see itself, so no row is fully masked (that
        # would give NaNs, which then leak through zero attention weights); masked tokens are never seen by others.
        n = x.shape[1]
        keys = torch.cat([text_mask, text_mask.new_ones(b, NUM_EXTRA_TOKENS)], dim=1)  # [B, N]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        allowed = (causal & keys[:, None, :]) | eye  # [B, N, N]
        for block in self.blocks:
            x = block(x, allowed[:, None])
        return self.out(self.norm_out(x[:, -1]))
