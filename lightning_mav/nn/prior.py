"""P: the DALL·E 2 diffusion prior, text -> CLIP image embedding ``y_e``.

A causal (decoder-only) transformer reads one sequence per sample,

    [ text tokens x̂ (projected CLIP hidden states) ... | e_x | timestep | noised y_t | learned query ]

and the output at the final query token is the prediction (the clean ``y_e`` under the x0 objective, as in
DALL·E 2; any objective works since it is just a ``[B, D]`` regression). The causal mask lets every position see
all the conditioning before it, and nothing later in the sequence leaks back into the text positions.

Classifier-free guidance: ``drop_cond`` replaces ``e_x`` by a learned null embedding and masks out all text tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_mav.nn.embeddings import TimestepEmbedding
from lightning_mav.nn.mixed_precision import attention

NUM_EXTRA_TOKENS = 4  # e_x, timestep, y_t, query


class Block(nn.Module):
    """Pre-LayerNorm transformer block: masked self-attention and an MLP, both residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
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
    ) -> None:
        super().__init__()
        self.dim, self.max_text_len = dim, max_text_len
        self.text_in = nn.Linear(text_width, dim)
        self.text_embed_in = nn.Linear(embed_dim, dim)
        self.null_text_embed = nn.Parameter(torch.randn(dim) * 0.02)
        self.time_embed = TimestepEmbedding(dim, dim)
        self.image_in = nn.Linear(embed_dim, dim)
        self.query = nn.Parameter(torch.randn(dim) * 0.02)
        # Text positions 0..L-1 and the four fixed tokens after them, so shorter contexts keep the same positions
        # for e_x/t/y_t/query.
        self.pos_text = nn.Parameter(torch.randn(max_text_len, dim) * 0.01)
        self.pos_extra = nn.Parameter(torch.randn(NUM_EXTRA_TOKENS, dim) * 0.01)
        self.blocks = nn.ModuleList(Block(dim, heads, dim_head, mlp_ratio, dropout) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, embed_dim)

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
            drop_cond: ``[B]`` bool; True -> unconditional (null e_x, no text tokens).
        Returns:
            the prediction ``[B, D]`` (the clean ``y_e`` under the x0 objective).
        """
        b, length = text_hidden.shape[:2]
        if length > self.max_text_len:
            raise ValueError(f"text has {length} tokens, the prior accepts at most {self.max_text_len}")
        text_mask = text_mask.bool()
        e_x = self.text_embed_in(text_embed)
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
