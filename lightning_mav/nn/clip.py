"""C_x: the CLIP text encoder (``e_x``, BPE tokens ``x̂`` and their hidden states) and the CLIP image encoder (``y_e``).

A thin wrapper over an open_clip model. The architecture comes from an open_clip config name (``ViT-B-32``, ...)
or from the built-in ``"mav-tiny"`` (ViT) and ``"mav-tiny-rn"`` (ResNet image tower) configs, small enough to train
contrastively on Moving Shapes on a CPU.
Weights come only from local files: nothing here can download (no pretrained tags, no hub schemas, no HF towers).

Embeddings are L2-normalised by default (``normalize=True``): ``e_x`` and ``y_e`` live on the unit sphere of
CLIP space, which is what the prior P predicts and what the decoder D is conditioned on.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg
from open_clip.transformer import TextTransformer, text_global_pool
from torch import Tensor, nn

from lightning_mav.checkpoints import require_no_nan

# Small ViT + text transformer for the 32-64 px Moving Shapes data. The vocabulary stays open_clip's bundled BPE
# (49408 tokens) so the tokens x̂ are exactly open_clip's; captions are short, so 32 positions are plenty.
MAV_TINY: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}
# The same with open_clip's ModifiedResNet image tower: its y_e tells the Moving Shapes shapes apart far better than
# the ViT's, at a shorter step time. It is the demo's CLIP (experiments/clip.yaml, with hard-negative captions;
# docs/choices.md#clip-mav-tiny-rn-and-hard-negatives).
MAV_TINY_RN: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
    "text_cfg": MAV_TINY["text_cfg"],
}
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {"mav-tiny": MAV_TINY, "mav-tiny-rn": MAV_TINY_RN}


def resolve_config(model_name: str, model_cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """The open_clip model config dict for ``model_name`` (a copy), refusing anything that would need the network.

    ``model_cfg`` overrides the lookup (``model_name`` is then only a label). The config may carry an optional
    ``"preprocess_cfg"`` dict (``mean``, ``std``, ``interpolation``) as in open_clip's ``open_clip_config.json``.
    """
    if model_cfg is None:
        if ":" in model_name:  # 'hf-hub:' / 'local-dir:' schemas fetch configs and weights from elsewhere
            raise ValueError(f"CLIP model_name {model_name!r}: schemas are not supported; give a config name and a "
                             "local weights path (pretrained=...)")
        model_cfg = BUILTIN_CONFIGS.get(model_name) or open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise ValueError(f"unknown CLIP config {model_name!r}: use one of {sorted(BUILTIN_CONFIGS)} or of "
                             "open_clip.list_models()")
    cfg = copy.deepcopy(dict(model_cfg))
    text_cfg = cfg["text_cfg"]
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise ValueError(f"CLIP {model_name!r}: HuggingFace text towers/tokenizers download at build time; "
                         "only open_clip's native text transformer with the bundled BPE tokenizer is supported")
    if "multimodal_cfg" in cfg or text_cfg.get("embed_cls"):
        raise ValueError(f"CLIP {model_name!r}: CoCa-style text towers (appended class token) are not supported")
    if "timm_model_name" in cfg["vision_cfg"]:
        cfg["vision_cfg"]["timm_model_pretrained"] = False  # timm would otherwise download ImageNet weights
    return cfg


def _build_open_clip(cfg: dict[str, Any]) -> nn.Module:
    """Instantiate open_clip's CLIP / CustomTextCLIP from a config dict, as ``open_clip.create_model`` does."""
    cfg = copy.deepcopy(cfg)
    preprocess = asdict(PreprocessCfg())
    preprocess.update(cfg.pop("preprocess_cfg", None) or {})
    model_class = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
    model = model_class(**cfg)
    preprocess["size"] = model.visual.image_size
    set_model_preprocess_cfg(model, preprocess)
    return model


def _require_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


class CLIP(nn.Module):
    """C_x and the CLIP image encoder.

    Args:
        model_name: ``"mav-tiny"``, ``"mav-tiny-rn"`` or an open_clip config name (``"ViT-B-32"``, ...).
        pretrained: LOCAL open_clip weights file (``.pt``/``.bin``/``.pth``/``.safetensors``); ``None`` = random init.
        model_cfg: explicit open_clip config dict (overrides the name lookup).
        freeze: eval mode and ``requires_grad=False``; ``.train()`` then keeps it in eval mode and the encoders run
            without autograd.

    Attributes: ``embed_dim`` (D), ``text_width`` (W), ``context_length`` (L), ``image_size`` (H = W of the input).
    """

    def __init__(
        self,
        model_name: str = "mav-tiny",
        pretrained: str | None = None,
        model_cfg: dict[str, Any] | None = None,
        freeze: bool = True,
    ) -> None:
        super().__init__()
        self.model_name = model_name
        self.model_cfg = resolve_config(model_name, model_cfg)
        weights = _require_file(pretrained, "CLIP weights") if pretrained else None  # fail before building
        self.model = _build_open_clip(self.model_cfg)
        if weights is not None:
            open_clip.load_checkpoint(self.model, str(weights), strict=True, weights_only=True)

        text_cfg = self.model_cfg["text_cfg"]
        self.embed_dim: int = self.model_cfg["embed_dim"]
        self.text_width: int = text_cfg.get("width", 512)
        self.context_length: int = self.model.context_length
        size = self.model.visual.image_size
        self.image_size: tuple[int, int] = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        pp = self.model.visual.preprocess_cfg
        self.interpolation: str = pp.get("interpolation", "bicubic")
        self.register_buffer("image_mean", torch.tensor(pp["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(pp["std"]).view(1, 3, 1, 1), persistent=False)
        # open_clip's SimpleTokenizer reads the BPE merges bundled inside the package: no network.
        self.tokenizer = open_clip.SimpleTokenizer(context_length=self.context_length,
                                                   **(text_cfg.get("tokenizer_kwargs") or {}))
        self.frozen = False
        self.has_image_tower = self.has_text_tower = True
        if freeze:
            self.freeze()

    # ----------------------------------------------------------------------------------------------- towers
    def drop_image_tower(self) -> "CLIP":
        """Delete the image tower (``model.visual``) and free its memory: for training on precomputed ``y_e``
        (``mav embed``). ``encode_image`` then raises."""
        if self.has_image_tower:
            del self.model.visual
            self.has_image_tower = False
        return self

    def drop_text_tower(self) -> "CLIP":
        """Delete the text tower (transformer, token and positional embeddings, final norm, projection): for
        training P on precomputed text encodings. ``encode_text*`` then raise; ``tokenize`` still works."""
        if self.has_text_tower:
            m = self.model
            names = (("text",) if isinstance(m, open_clip.CustomTextCLIP) else
                     ("transformer", "token_embedding", "ln_final", "positional_embedding", "text_projection"))
            for name in names:
                delattr(m, name)
            self.has_text_tower = False
        return self

    def _require(self, tower: str, present: bool) -> None:
        if not present:
            raise RuntimeError(f"this CLIP was loaded without its {tower} tower (clip_{tower}_tower: false): "
                               f"the batch must carry the precomputed embeddings (data.init_args.embeds)")

    # ----------------------------------------------------------------------------------------------- freezing
    def freeze(self) -> "CLIP":
        self.frozen = True
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "CLIP":
        # Lightning calls .train() on the whole LightningModule each epoch; a frozen encoder stays in eval mode.
        return super().train(mode and not self.frozen)

    def _grad(self) -> torch.autograd.grad_mode.set_grad_enabled:
        return torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen)

    # ----------------------------------------------------------------------------------------------- text
    def tokenize(self, texts: list[str]) -> Tensor:
        """BPE-encode captions: ``x̂`` LongTensor ``[B, L]`` (SOT ... EOT, zero-padded, truncated to L)."""
        return self.tokenizer(list(texts), context_length=self.context_length).to(self.image_mean.device)

    def _text_tower(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Run the text transformer: (pooled features before projection ``[B, W]``, hidden states ``[B, L, W]``).

        Mirrors open_clip 3.3's ``CLIP.encode_text`` / ``TextTransformer.forward`` but keeps the per-token output
        (after ``ln_final``) that those throw away.
        """
        m = self.model
        if isinstance(m, open_clip.CustomTextCLIP):
            text = m.text
            if not isinstance(text, TextTransformer):
                raise TypeError(f"unsupported text tower {type(text).__name__}")
            x, attn_mask = text._embeds(tokens)  # token + positional embeddings, causal (and pad) mask
            hidden = text.ln_final(text.transformer(x, attn_mask=attn_mask))
            pooled = text_global_pool(hidden, tokens, text.pool_type, eos_token_id=text.eos_id)
        else:
            cast = m.transformer.get_cast_dtype()
            x = m.token_embedding(tokens).to(cast) + m.positional_embedding.to(cast)
            hidden = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
            pooled = text_global_pool(hidden, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        return pooled, hidden

    def _project_text(self, pooled: Tensor) -> Tensor:
        m = self.model
        proj = m.text.text_projection if isinstance(m, open_clip.CustomTextCLIP) else m.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj

    def encode_text_hidden(self, tokens: Tensor, normalize: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """``x̂ [B, L]`` -> (``e_x [B, D]``, hidden states ``[B, L, W]``, mask ``[B, L]`` bool: True = real token)."""
        self._require("text", self.has_text_tower)
        with self._grad():
            pooled, hidden = self._text_tower(tokens)
            e_x = self._project_text(pooled)
        # Padding id is 0 in open_clip's BPE (SOT/EOT are the two highest ids, never 0).
        mask = tokens != 0
        return (F.normalize(e_x, dim=-1) if normalize else e_x), hidden, mask

    def encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        """``x̂ [B, L]`` -> ``e_x [B, D]`` (the pooled, projected CLIP text embedding)."""
        return self.encode_text_hidden(tokens, normalize)[0]

    # ----------------------------------------------------------------------------------------------- images
    def preprocess(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> CLIP input ``[B, 3, h, w]``: shortest side resized, centre crop, normalised."""
        x = (images.to(self.image_mean.dtype) + 1) / 2
        h, w = self.image_size
        if tuple(x.shape[-2:]) != (h, w):
            scale = max(h / x.shape[-2], w / x.shape[-1])  # like open_clip's 'shortest' resize mode
            size = (max(h, round(x.shape[-2] * scale)), max(w, round(x.shape[-1] * scale)))
            mode = self.interpolation if self.interpolation in ("bilinear", "bicubic") else "bilinear"
            x = F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False).clamp(0, 1)
            top, left = (size[0] - h) // 2, (size[1] - w) // 2
            x = x[..., top:top + h, left:left + w]
        return (x - self.image_mean) / self.image_std

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] (any size) -> ``y_e [B, D]``."""
        self._require("image", self.has_image_tower)
        with self._grad():
            y_e = self.model.encode_image(self.preprocess(images))
        return F.normalize(y_e, dim=-1) if normalize else y_e

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, model_name: str | None = None, freeze: bool = True) -> "CLIP":
        """Load a CLIPStage Lightning checkpoint (``.ckpt``; architecture from its hyper_parameters) or, with
        ``model_name``, an open_clip weights file (``.pt``/``.bin``/``.pth``/``.safetensors``)."""
        p = _require_file(path, "CLIP checkpoint")
        if p.suffix != ".ckpt":
            if model_name is None:
                raise ValueError(f"{p} is not a Lightning .ckpt: pass model_name= (e.g. 'ViT-B-32') to load it as "
                                 "open_clip weights")
            return cls(model_name, pretrained=str(p), freeze=freeze)
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
        hp = ckpt.get("hyper_parameters") or {}
        clip = cls(hp.get("model_name", "mav-tiny"), model_cfg=hp.get("model_cfg"), freeze=freeze)
        # With EMA weight averaging the checkpoint's state_dict already holds the averaged weights.
        state = {k[len("clip."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("clip.")}
        if not state:
            raise ValueError(f"{p} holds no 'clip.' weights: is it a CLIPStage checkpoint?")
        require_no_nan(state, p)
        clip.load_state_dict(state, strict=True)
        return clip
