"""Karlo's diffusion prior (diffusers ``PriorTransformer``) as our :class:`~lightning_mav.nn.prior.Prior`.

``PriorTransformer`` reads ``[projected text hidden states (L) | e_x | timestep | y_t | prd query]`` with one
learned position per token, a causal mask plus a padding mask of -10000 (exactly zero attention in float32 softmax,
as our boolean mask), pre-LayerNorm blocks (attention with q/k/v bias, exact-GELU MLP of width 4·dim, LayerNorm eps
1e-5), ``norm_out`` and a projection of the last token: our Prior with ``qkv_bias=True``, ``text_null="none"``
(Karlo's unconditional branch is the empty prompt ``""``) and ``embed_stats=True`` (``clip_mean``/``clip_std``).

Differences that cannot matter for Karlo: diffusers needs exactly ``num_embeddings`` text tokens (we accept fewer;
the positions of the four extra tokens stay those after the ``num_embeddings`` text positions), and its dropout acts
on the attention output where ours acts on the attention weights (training only; Karlo's is 0).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_mav.nn.prior import NUM_EXTRA_TOKENS, Prior

__all__ = ["PRIOR_DEFAULTS", "prior_kwargs_from_diffusers", "prior_state_from_diffusers"]

# PriorTransformer.__init__'s defaults (diffusers 0.12 - 0.42): a saved config.json omits keys added later
# (Karlo's lists only num_attention_heads .. num_layers, embedding_dim, num_embeddings, additional_embeddings, dropout).
PRIOR_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 32, "attention_head_dim": 64, "num_layers": 20, "embedding_dim": 768,
    "num_embeddings": 77, "additional_embeddings": 4, "dropout": 0.0, "time_embed_act_fn": "silu",
    "norm_in_type": None, "embedding_proj_norm_type": None, "encoder_hid_proj_type": "linear",
    "added_emb_type": "prd", "time_embed_dim": None, "embedding_proj_dim": None, "clip_embed_dim": None,
}


def prior_kwargs_from_diffusers(config: dict[str, Any], *, source: str) -> dict[str, Any]:
    """Our :class:`Prior` kwargs for a ``PriorTransformer`` config (its ``config.json`` as a dict).

    ``embed_dim`` is the CLIP embedding size (``proj_in``'s, ``embedding_proj``'s input and
    ``proj_to_clip_embeddings``' output), ``text_width`` the input width of ``encoder_hidden_states_proj`` (both
    ``embedding_dim`` in diffusers; 768 for Karlo), ``max_text_len`` its ``num_embeddings``. Keys starting with
    ``_`` (``_class_name``, ``_diffusers_version``) are metadata; any other unknown key, or a value our Prior cannot
    run, raises ``ValueError("<source>: <key> is <value>, expected <what>")``.
    """
    if config.get("_class_name", "PriorTransformer") != "PriorTransformer":
        raise ValueError(f"{source}: _class_name is {config['_class_name']!r}, expected 'PriorTransformer'")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in PRIOR_DEFAULTS)
    if unknown:
        raise ValueError(f"{source}: {unknown[0]} is {config[unknown[0]]!r}, expected no such key "
                         f"(known: {', '.join(PRIOR_DEFAULTS)})")
    cfg = {**PRIOR_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}

    def expect(key: str, ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"{source}: {key} is {cfg[key]!r}, expected {what}")

    for key in ("num_attention_heads", "attention_head_dim", "num_layers", "embedding_dim", "num_embeddings"):
        expect(key, isinstance(cfg[key], int) and not isinstance(cfg[key], bool) and cfg[key] > 0,
               "a positive integer")
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    width = cfg["embedding_dim"]
    expect("additional_embeddings", cfg["additional_embeddings"] == NUM_EXTRA_TOKENS,
           f"{NUM_EXTRA_TOKENS} (e_x, timestep, y_t, prd query)")
    expect("added_emb_type", cfg["added_emb_type"] == "prd", "'prd' (the learned query token read out)")
    expect("encoder_hid_proj_type", cfg["encoder_hid_proj_type"] == "linear", "'linear' (text hidden states in)")
    expect("norm_in_type", cfg["norm_in_type"] is None, "None (no input LayerNorm)")
    expect("embedding_proj_norm_type", cfg["embedding_proj_norm_type"] is None, "None (no LayerNorm on e_x)")
    expect("time_embed_act_fn", cfg["time_embed_act_fn"] == "silu", "'silu'")
    expect("time_embed_dim", cfg["time_embed_dim"] in (None, inner), f"None or the inner dim {inner}")
    expect("embedding_proj_dim", cfg["embedding_proj_dim"] in (None, width), f"None or embedding_dim {width}")
    expect("clip_embed_dim", cfg["clip_embed_dim"] in (None, width), f"None or embedding_dim {width}")
    expect("dropout", isinstance(cfg["dropout"], (int, float)) and 0 <= cfg["dropout"] < 1, "a float in [0, 1)")
    return dict(embed_dim=width, text_width=width, max_text_len=cfg["num_embeddings"], dim=inner,
                depth=cfg["num_layers"], heads=cfg["num_attention_heads"], dim_head=cfg["attention_head_dim"],
                mlp_ratio=4.0, dropout=float(cfg["dropout"]), qkv_bias=True, text_null="none", embed_stats=True)


def _renames(depth: int) -> dict[str, str]:
    """diffusers key -> our key, for the one-to-one tensors."""
    names = {
        "time_embedding.linear_1.{}": "time_embed.mlp.0.{}", "time_embedding.linear_2.{}": "time_embed.mlp.2.{}",
        "proj_in.{}": "image_in.{}", "embedding_proj.{}": "text_embed_in.{}",
        "encoder_hidden_states_proj.{}": "text_in.{}", "norm_out.{}": "norm_out.{}",
        "proj_to_clip_embeddings.{}": "out.{}",
    }
    for i in range(depth):
        names.update({
            f"transformer_blocks.{i}.norm1.{{}}": f"blocks.{i}.norm1.{{}}",
            f"transformer_blocks.{i}.attn1.to_out.0.{{}}": f"blocks.{i}.proj.{{}}",
            f"transformer_blocks.{i}.norm3.{{}}": f"blocks.{i}.norm2.{{}}",
            f"transformer_blocks.{i}.ff.net.0.proj.{{}}": f"blocks.{i}.mlp.0.{{}}",
            f"transformer_blocks.{i}.ff.net.2.{{}}": f"blocks.{i}.mlp.3.{{}}",
        })
    return {src.format(p): dst.format(p) for src, dst in names.items() for p in ("weight", "bias")}


def prior_state_from_diffusers(state: dict[str, Tensor], kwargs: dict[str, Any], *, source: str) -> dict[str, Tensor]:
    """Our Prior's state dict from a ``PriorTransformer`` state dict, for ``Prior(**kwargs)``.

    ``attn1.to_q/to_k/to_v`` are stacked row-wise into ``qkv`` (our heads split ``[3, heads, dim_head]``),
    ``positional_embedding [1, L+4, dim]`` splits into ``pos_text``/``pos_extra``, ``prd_embedding`` becomes
    ``query`` and ``clip_mean``/``clip_std [1, D]`` lose their leading 1. Every diffusers key must be used (the
    non-persistent ``causal_attention_mask`` of old exports is skipped) and every tensor must have the shape of our
    module built on the meta device; otherwise ``ValueError`` naming ``source``, the key and both shapes.
    """
    with torch.device("meta"):
        ours = Prior(**kwargs)
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    depth, length = len(ours.blocks), ours.max_text_len
    remaining = {k: v for k, v in state.items() if k != "causal_attention_mask"}
    out: dict[str, Tensor] = {}

    def take(key: str) -> Tensor:
        if key not in remaining:
            raise ValueError(f"{source}: missing key {key}")
        return remaining.pop(key)

    def put(ours_key: str, value: Tensor, src: str) -> None:
        if ours_key not in expected:
            raise ValueError(f"{source}: {src} has no counterpart {ours_key} in Prior(**{kwargs})")
        want = expected[ours_key]
        if tuple(value.shape) != want:
            raise ValueError(f"{source}: {src} has shape {tuple(value.shape)}, expected {want} (for {ours_key})")
        out[ours_key] = value

    def take_shaped(key: str, shape: tuple[int, ...]) -> Tensor:
        value = take(key)
        if tuple(value.shape) != shape:
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, expected {shape}")
        return value

    for src, dst in _renames(depth).items():
        put(dst, take(src), src)
    dim = ours.dim
    qkv_in = expected["blocks.0.qkv.weight"][0] // 3 if depth else 0
    for i in range(depth):
        attn = f"transformer_blocks.{i}.attn1"
        for p, shape in (("weight", (qkv_in, dim)), ("bias", (qkv_in,))):
            parts = [take_shaped(f"{attn}.to_{n}.{p}", shape) for n in "qkv"]
            put(f"blocks.{i}.qkv.{p}", torch.cat(parts), f"{attn}.to_q/k/v.{p}")
    pos = take_shaped("positional_embedding", (1, length + NUM_EXTRA_TOKENS, dim))[0]
    put("pos_text", pos[:length], "positional_embedding")
    put("pos_extra", pos[length:], "positional_embedding")
    put("query", take_shaped("prd_embedding", (1, 1, dim)).reshape(dim), "prd_embedding")
    embed = expected["clip_mean"][0]
    for name in ("clip_mean", "clip_std"):
        put(name, take_shaped(name, (1, embed))[0], name)

    if remaining:
        raise ValueError(f"{source}: unexpected key {sorted(remaining)[0]} ({len(remaining)} unused in all)")
    missing = sorted(set(expected) - set(out))
    if missing:  # our module has a tensor no diffusers key maps to (a kwargs / converter mismatch)
        raise ValueError(f"{source}: nothing converts to our {missing[0]} (kwargs {kwargs})")
    return out
