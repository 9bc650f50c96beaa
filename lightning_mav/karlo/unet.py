"""Karlo's decoder and super-resolution U-Nets (diffusers' layout) as this package's ``UNet``.

Karlo (kakaobrain/karlo-v1-alpha) ships unCLIP's networks as diffusers models: the decoder is a
``UNet2DConditionModel`` (``ResnetDownsampleBlock2D`` / ``SimpleCrossAttn*Block2D`` levels, a
``UNetMidBlock2DSimpleCrossAttn``, scale-shift time conditioning) fed by an ``UnCLIPTextProjModel`` (``text_proj``),
the two super-resolution networks are ``UNet2DModel``s (``ResnetDownsampleBlock2D`` / ``ResnetUpsampleBlock2D``
levels, additive time conditioning, no attention). ``unet_kwargs_from_diffusers`` turns their configs into ``UNet``
keyword arguments, ``unet_state_from_diffusers`` their weights into the state dict of that ``UNet`` (``temporal=False``;
a ``D_t`` built with ``temporal=True`` loads it with ``strict=False``, missing only its temporal layers).

What maps to what (``UNet`` option: diffusers):

- ``resample="resblock"``: the ``downsamplers`` / ``upsamplers`` are ``ResnetBlock2D(down=True / up=True)``;
- ``time_cond``: ``resnet_time_scale_shift`` (``"scale_shift"`` / ``"default"`` -> ``"add"``);
- ``heads=None, dim_head``: ``attention_head_dim`` (heads = channels // it), ``attn_norm="group"`` and
  ``attn_bias=True``: the ``Attention``'s ``group_norm`` and biased ``to_q/to_k/to_v``, ``add_k_proj/add_v_proj``
  (fused into ``to_qkv`` / ``to_context_kv`` by stacking rows);
- decoder conditioning (``text_proj``): ``null_image_embed``: ``learned_classifier_free_guidance_embeddings``,
  ``image_embed_proj``: ``clip_image_embeddings_project_to_time_embeddings``, ``text_embed_proj``: ``embedding_proj``,
  ``image_tokens_proj``: ``clip_extra_context_tokens_proj`` (rows permuted: diffusers reads token ``k``, channel
  ``j`` at row ``j*K + k``, ``UNet`` at ``k*cond_dim + j``), ``text_proj``: ``encoder_hidden_states_proj``,
  ``context_norm`` (``context_norm="text"``): ``text_encoder_hidden_states_norm``; ``text_null="none"`` because
  Karlo's unconditional branch encodes the empty caption rather than learning a null text;
- super-resolution: ``lowres_cond=True`` with ``lowres_channels = in_channels - out_channels``, no noise-level
  embedding (``lowres_noise_cond=False``) and the pipeline's antialiased bicubic resize (``lowres_resize``).

Everything else a config may say (other block types, cross-attention norms, class embeddings, ...) is rejected with a
one-line ``ValueError`` naming the config file, the key, its value and what is supported, before any weight is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..nn.p3d import Attn_P3D
from ..nn.unet import Downsample, ResBlock, UNet, Upsample

__all__ = ["unet_kwargs_from_diffusers", "unet_state_from_diffusers"]

CONDITION_UNET, PLAIN_UNET = "UNet2DConditionModel", "UNet2DModel"
RES_DOWN, ATTN_DOWN = "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"
RES_UP, ATTN_UP = "ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"
ATTN_MID, PLAIN_MID = "UNetMidBlock2DSimpleCrossAttn", "UNetMidBlock2D"

# Settings this conversion supports as diffusers' defaults say them: (key, diffusers' default, allowed values).
_COMMON = (
    ("act_fn", "silu", ("silu", "swish")),
    ("norm_eps", 1e-5, (1e-5,)),
    ("flip_sin_to_cos", True, (True,)),
    ("freq_shift", 0, (0,)),
    ("center_input_sample", False, (False,)),
    ("time_embedding_type", "positional", ("positional",)),
    ("mid_block_scale_factor", 1, (1,)),
    ("resnet_time_scale_shift", "default", ("scale_shift", "default")),
)
_CONDITION_ONLY = (
    ("class_embed_type", None, ("identity",)),
    ("num_class_embeds", None, (None,)),
    ("addition_embed_type", None, (None,)),
    ("encoder_hid_dim", None, (None,)),
    ("encoder_hid_dim_type", None, (None,)),
    ("time_embedding_act_fn", None, (None,)),
    ("timestep_post_act", None, (None,)),
    ("time_cond_proj_dim", None, (None,)),
    ("projection_class_embeddings_input_dim", None, (None,)),
    ("class_embeddings_concat", False, (False,)),
    ("only_cross_attention", False, (False,)),
    ("mid_block_only_cross_attention", None, (None, False)),
    ("cross_attention_norm", None, (None,)),
    ("resnet_skip_time_act", False, (False,)),
    ("resnet_out_scale_factor", 1.0, (1.0,)),
    ("conv_in_kernel", 3, (3,)),
    ("conv_out_kernel", 3, (3,)),
    ("num_attention_heads", None, (None,)),
    ("attention_type", "default", ("default",)),
    ("dual_cross_attention", False, (False,)),
    ("mid_block_type", "UNetMidBlock2DCrossAttn", (ATTN_MID,)),
)
_PLAIN_ONLY = (
    ("class_embed_type", None, (None,)),
    ("num_class_embeds", None, (None,)),
    ("mid_block_type", PLAIN_MID, (PLAIN_MID,)),
)


def _fail(source: str, key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{source}: {key} is {value!r}, expected {expected}")


def _check(config: dict, table: tuple, source: str) -> None:
    for key, default, allowed in table:
        value = config.get(key, default)
        # `value in allowed` alone would take 1 for True and 0 for False
        if not any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed):
            expected = " or ".join(repr(a) for a in allowed)
            raise _fail(source, key, value, expected)


def _uniform(config: dict, key: str, default: Any, source: str, *, allow_none: bool = False) -> Any:
    """A per-level setting that must be one value (an int, or a list of equal ints)."""
    value = config.get(key, default)
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    ok = values and all(v == values[0] for v in values) and (
        (values[0] is None and allow_none) or (isinstance(values[0], int) and not isinstance(values[0], bool)
                                               and values[0] > 0))
    if not ok:
        raise _fail(source, key, value, "one positive int for every level" + (" or None" if allow_none else ""))
    return values[0]


def unet_kwargs_from_diffusers(config: dict, text_proj_config: dict | None = None, *, source: str) -> dict:
    """``UNet`` keyword arguments for a diffusers U-Net config (Karlo's decoder or super-resolution network).

    Args:
        config: a diffusers ``UNet2DConditionModel`` config (Karlo's decoder; needs ``text_proj_config``) or
            ``UNet2DModel`` config (Karlo's super-resolution networks), as its ``config.json`` or ``model.config``.
            ``_class_name`` decides which; without it, ``cross_attention_dim`` marks a ``UNet2DConditionModel``.
        text_proj_config: the decoder's ``UnCLIPTextProjModel`` config (``None`` for a ``UNet2DModel``).
        source: the config's path, named in error messages.

    Returns:
        ``UNet`` kwargs (``temporal=False``; lists, as a YAML would give them).

    Raises:
        ValueError: one line ``"<source>: <key> is <value>, expected <what>"`` for anything the ``UNet`` cannot
            express (other block types or architectures, a down level whose attention differs from its mirrored up
            level, cross-attention norms, class embeddings, ...).
    """
    kind = config.get("_class_name")
    if kind is None:
        kind = CONDITION_UNET if "cross_attention_dim" in config else PLAIN_UNET if "add_attention" in config else None
    if kind not in (CONDITION_UNET, PLAIN_UNET):
        raise _fail(source, "_class_name", kind, f"{CONDITION_UNET!r} (Karlo's decoder) or {PLAIN_UNET!r} (super-res)")
    cond = kind == CONDITION_UNET

    # ---- the level structure: Karlo's block types only, attention mirrored between a down level and its up level
    down = list(config.get("down_block_types") or ())
    up = list(config.get("up_block_types") or ())
    channels = list(config.get("block_out_channels") or ())
    allowed_down = (RES_DOWN, ATTN_DOWN) if cond else (RES_DOWN,)
    if not down:
        raise _fail(source, "down_block_types", config.get("down_block_types"), f"a list of {' / '.join(allowed_down)}")
    for i, block in enumerate(down):
        if block not in allowed_down:
            raise _fail(source, f"down_block_types[{i}]", block, " or ".join(map(repr, allowed_down)))
    if len(up) != len(down):
        raise _fail(source, "up_block_types", config.get("up_block_types"),
                    f"{len(down)} blocks mirroring down_block_types")
    for i, block in enumerate(up):
        mirror = down[len(down) - 1 - i]
        expected = ATTN_UP if mirror == ATTN_DOWN else RES_UP
        if block != expected:
            raise _fail(source, f"up_block_types[{i}]", block,
                        f"{expected!r} (mirroring down_block_types[{len(down) - 1 - i}] {mirror!r})")
    if len(channels) != len(down) or not all(isinstance(c, int) and c > 0 for c in channels):
        raise _fail(source, "block_out_channels", config.get("block_out_channels"), f"{len(down)} positive ints")
    dim = channels[0]
    if any(c % dim for c in channels):
        raise _fail(source, "block_out_channels", channels, f"multiples of the first width {dim}")

    _check(config, _COMMON, source)
    _check(config, _CONDITION_ONLY if cond else _PLAIN_ONLY, source)
    groups = config.get("norm_num_groups", 32)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or any(c % groups for c in channels):
        raise _fail(source, "norm_num_groups", groups, f"a positive int dividing every block_out_channels {channels}")
    time_embedding_dim = config.get("time_embedding_dim")
    if time_embedding_dim not in (None, 4 * dim):
        raise _fail(source, "time_embedding_dim", time_embedding_dim, f"None or {4 * dim} (4 * block_out_channels[0])")
    layers = _uniform(config, "layers_per_block", 2, source)
    dropout = config.get("dropout", 0.0)
    time_cond = "scale_shift" if config.get("resnet_time_scale_shift", "default") == "scale_shift" else "add"
    kwargs: dict[str, Any] = {
        "dim": dim,
        "dim_mults": [c // dim for c in channels],
        "num_res_blocks": layers,
        "attn_levels": [i for i, block in enumerate(down) if block == ATTN_DOWN],
        "norm_groups": groups,
        "dropout": float(dropout),
        "resample": "resblock",
        "time_cond": time_cond,
        "attn_norm": "group",
        "attn_bias": True,
    }

    if cond:
        if text_proj_config is None:
            raise _fail(source, "text_proj config", None, "the decoder's UnCLIPTextProjModel config")
        head_dim = _uniform(config, "attention_head_dim", 8, source)
        cross_dim = _uniform(config, "cross_attention_dim", 1280, source)
        embed_dim, tokens = _text_proj_settings(text_proj_config, cross_dim, 4 * dim, source)
        kwargs.update({
            "in_channels": config.get("in_channels", 4),
            "out_channels": config.get("out_channels", 4),
            "mid_attn": True,
            "heads": None,
            "dim_head": head_dim,
            "image_embed_dim": embed_dim,
            "num_image_tokens": tokens,
            "text_dim": embed_dim,
            "text_embed_dim": embed_dim,
            "cond_dim": cross_dim,
            "text_null": "none",
            "context_norm": "text",
        })
        return kwargs

    if text_proj_config is not None:
        raise _fail(source, "text_proj config", "given", f"None for a {PLAIN_UNET}")
    in_ch, out_ch = config.get("in_channels", 3), config.get("out_channels", 3)
    if in_ch != 2 * out_ch:
        raise _fail(source, "in_channels", in_ch, f"{2 * out_ch} (2 * out_channels: x and the upsampled low-res image)")
    add_attention = config.get("add_attention", True)
    if add_attention not in (True, False):
        raise _fail(source, "add_attention", add_attention, "True or False")
    head_dim = _uniform(config, "attention_head_dim", 8, source, allow_none=True)
    if add_attention:
        # diffusers' mid attention normalises with attn_norm_num_groups, else norm_num_groups under "default"
        # time conditioning, else not at all
        attn_groups = config.get("attn_norm_num_groups")
        if attn_groups is None and time_cond == "add":
            attn_groups = groups
        if attn_groups != groups:
            raise _fail(source, "attn_norm_num_groups", config.get("attn_norm_num_groups"),
                        f"None or {groups} (the mid attention's GroupNorm must have norm_num_groups groups)")
    kwargs.update({
        "in_channels": out_ch,
        "out_channels": out_ch,
        "mid_attn": bool(add_attention),
        # attention_head_dim None: one head as wide as the channels
        "heads": None if head_dim else 1,
        "dim_head": head_dim,
        "lowres_cond": True,
        "lowres_channels": in_ch - out_ch,
        "lowres_noise_cond": False,
        "lowres_resize": "bicubic",
    })
    return kwargs


def _text_proj_settings(config: dict, cross_dim: int, time_dim: int, source: str) -> tuple[int, int]:
    """``(clip_embeddings_dim, clip_extra_context_tokens)`` of the decoder's ``UnCLIPTextProjModel`` config."""
    kind = config.get("_class_name", "UnCLIPTextProjModel")
    if kind != "UnCLIPTextProjModel":
        raise _fail(source, "text_proj _class_name", kind, "'UnCLIPTextProjModel'")
    for key, expected in (("cross_attention_dim", cross_dim), ("time_embed_dim", time_dim)):
        if config.get(key) != expected:
            raise _fail(source, f"text_proj {key}", config.get(key), f"{expected} (the decoder's)")
    embed_dim, tokens = config.get("clip_embeddings_dim", 768), config.get("clip_extra_context_tokens", 4)
    for key, value in (("clip_embeddings_dim", embed_dim), ("clip_extra_context_tokens", tokens)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _fail(source, f"text_proj {key}", value, "a positive int")
    return embed_dim, tokens


# ------------------------------------------------------------------------------------------------------- weights
# leaves of one module: (our name, diffusers name or names whose rows are stacked)
_PLAIN = (("weight", "weight"), ("bias", "bias"))
_RES = (
    ("norm1.weight", "norm1.weight"), ("norm1.bias", "norm1.bias"),
    ("conv1.spatial.weight", "conv1.weight"), ("conv1.spatial.bias", "conv1.bias"),
    ("emb_proj.weight", "time_emb_proj.weight"), ("emb_proj.bias", "time_emb_proj.bias"),
    ("norm2.weight", "norm2.weight"), ("norm2.bias", "norm2.bias"),
    ("conv2.spatial.weight", "conv2.weight"), ("conv2.spatial.bias", "conv2.bias"),
    ("skip.weight", "conv_shortcut.weight"), ("skip.bias", "conv_shortcut.bias"),
)
_ATTN = (
    ("spatial.norm.weight", "group_norm.weight"), ("spatial.norm.bias", "group_norm.bias"),
    ("spatial.to_qkv.weight", ("to_q.weight", "to_k.weight", "to_v.weight")),
    ("spatial.to_qkv.bias", ("to_q.bias", "to_k.bias", "to_v.bias")),
    ("spatial.to_context_kv.weight", ("add_k_proj.weight", "add_v_proj.weight")),
    ("spatial.to_context_kv.bias", ("add_k_proj.bias", "add_v_proj.bias")),
    ("spatial.to_out.weight", "to_out.0.weight"), ("spatial.to_out.bias", "to_out.0.bias"),
)
_PARAM = (("", ""),)  # the module is a parameter itself
_LEAVES = {"plain": _PLAIN, "res": _RES, "attn": _ATTN, "param": _PARAM}


def _module_pairs(model: UNet) -> Iterator[tuple[str, str, str]]:
    """``(our module, diffusers module, leaves)`` in the order of the forward pass; ``text_proj.*`` names are the
    ``UnCLIPTextProjModel``'s."""
    yield "time_embed.mlp.0", "time_embedding.linear_1", "plain"
    yield "time_embed.mlp.2", "time_embedding.linear_2", "plain"
    yield "null_image_embed", "text_proj.learned_classifier_free_guidance_embeddings", "param"
    yield "image_embed_proj", "text_proj.clip_image_embeddings_project_to_time_embeddings", "plain"
    yield "text_embed_proj", "text_proj.embedding_proj", "plain"
    yield "image_tokens_proj", "text_proj.clip_extra_context_tokens_proj", "plain"  # rows permuted, see below
    yield "text_proj", "text_proj.encoder_hidden_states_proj", "plain"
    yield "context_norm", "text_proj.text_encoder_hidden_states_norm", "plain"
    yield "conv_in.spatial", "conv_in", "plain"

    # down: each level's res blocks (each followed by its attention), then its downsampler
    level = k = 0
    for j, block in enumerate(model.down):
        if isinstance(block[0], Downsample) or block[0].resample == "down":
            yield f"down.{j}.0", f"down_blocks.{level}.downsamplers.0", "res"
            level, k = level + 1, 0
            continue
        yield f"down.{j}.0", f"down_blocks.{level}.resnets.{k}", "res"
        if len(block) > 1:
            yield f"down.{j}.1", f"down_blocks.{level}.attentions.{k}", "attn"
        k += 1

    # mid: res, attention, res
    yield "mid.0", "mid_block.resnets.0", "res"
    if isinstance(model.mid[1], Attn_P3D):
        yield "mid.1", "mid_block.attentions.0", "attn"
    yield f"mid.{len(model.mid) - 1}", "mid_block.resnets.1", "res"

    # up: from the deepest level, res blocks (+ attention), the last one followed by the upsampler
    level = k = 0
    for j, block in enumerate(model.up):
        yield f"up.{j}.0", f"up_blocks.{level}.resnets.{k}", "res"
        k += 1
        for i, layer in enumerate(block[1:], 1):
            if isinstance(layer, Attn_P3D):
                yield f"up.{j}.{i}", f"up_blocks.{level}.attentions.{k - 1}", "attn"
            elif isinstance(layer, (ResBlock, Upsample)):
                yield f"up.{j}.{i}", f"up_blocks.{level}.upsamplers.0", "res"
                level, k = level + 1, 0

    yield "out_norm", "conv_norm_out", "plain"
    yield "out_conv.spatial", "conv_out", "plain"


def _shape(t: Tensor | torch.Size) -> tuple[int, ...]:
    return tuple(t.shape if isinstance(t, Tensor) else t)


def unet_state_from_diffusers(state: dict[str, Tensor], kwargs: dict, text_proj_state: dict[str, Tensor] | None = None,
                              *, source: str) -> dict[str, Tensor]:
    """The ``UNet(**kwargs)`` state dict (``temporal=False``) holding a diffusers U-Net's weights.

    Args:
        state: the diffusers ``UNet2DConditionModel`` / ``UNet2DModel`` state dict.
        kwargs: ``unet_kwargs_from_diffusers``'s result for its config.
        text_proj_state: the decoder's ``UnCLIPTextProjModel`` state dict (``None`` for a super-res network).
        source: the weights' path, named in error messages.

    Returns:
        ``{name: tensor}`` with exactly the parameter names and shapes of ``UNet(**kwargs, temporal=False)``
        (``fps_cond`` off); the tensors keep the dtype they came in.

    Raises:
        ValueError: one line naming ``source``, the key and the expected vs found shape, for a diffusers key that is
            missing, of the wrong shape, or left unused.
    """
    with torch.device("meta"):  # shapes only: no memory, no init
        model = UNet(**{**kwargs, "temporal": False, "fps_cond": False})
    expected = {name: _shape(p) for name, p in model.state_dict().items()}
    theirs = dict(state)
    for key, value in (text_proj_state or {}).items():
        theirs[f"text_proj.{key}"] = value
    used: set[str] = set()
    out: dict[str, Tensor] = {}

    def take(key: str, ours: str) -> Tensor:
        if key not in theirs:
            raise ValueError(f"{source}: key {key} is missing, expected shape {expected[ours]} (for {ours})")
        used.add(key)
        return theirs[key]

    for ours_module, their_module, leaves in _module_pairs(model):
        for ours_leaf, their_leaf in _LEAVES[leaves]:
            ours = f"{ours_module}.{ours_leaf}".rstrip(".")
            if ours not in expected:  # e.g. no skip conv at equal widths, no context k/v without context
                continue
            keys = [their_leaf] if isinstance(their_leaf, str) else list(their_leaf)
            keys = [f"{their_module}.{k}".rstrip(".") for k in keys]
            tensors = [take(k, ours) for k in keys]
            tensor = tensors[0] if len(tensors) == 1 else torch.cat(tensors, 0)
            if _shape(tensor) != expected[ours]:
                raise ValueError(f"{source}: key {' + '.join(keys)} has shape {_shape(tensor)}, expected "
                                 f"{expected[ours]} (for {ours})")
            if ours_module == "image_tokens_proj":
                # diffusers: token k, channel j at row j*K + k; ours: at row k*cond_dim + j
                tokens = model.num_image_tokens
                tensor = tensor.reshape(-1, tokens, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)
            out[ours] = tensor.contiguous()

    unconverted = [name for name in expected if name not in out]
    if unconverted:  # an option without a diffusers counterpart (e.g. lowres_noise_cond=True)
        raise ValueError(f"{source}: no diffusers key for {unconverted[0]} (shape {expected[unconverted[0]]})"
                         + (f" and {len(unconverted) - 1} more" if len(unconverted) > 1 else ""))
    unused = [key for key in theirs if key not in used]
    if unused:
        raise ValueError(f"{source}: key {unused[0]} (shape {_shape(theirs[unused[0]])}) has no place in the "
                         f"converted UNet" + (f", nor {len(unused) - 1} more" if len(unused) > 1 else ""))
    return {name: out[name] for name in expected}
