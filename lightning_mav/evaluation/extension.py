"""↑F's extrapolation on held-out real clips, as the reports show it: one clip extended by ↑F next to the real one
(a contact sheet and a gif under ``out/extension/``) and the report's section. The scores (``extend/*``) come from
:func:`lightning_mav.evaluation.real_data.score_extension`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_mav.media import contact_sheet, save_png, write_gif


def write_extension_media(out: Path, example: dict[str, Any]) -> dict[str, Any]:
    """The example clip as ``out/extension/sheet.png`` (every frame; top: the real clip, bottom: its first
    ``known`` frames extended by ↑F) and ``out/extension/real-vs-extended.gif`` (side by side). A folder of its own:
    rewritten every run, like the scores, while the samples' media under videos/ and sheets/ are reused."""
    real, extended = example["real"].float(), example["extended"].float()
    sheet = save_png(contact_sheet(torch.stack([real, extended]), max_frames=real.shape[1]),
                     out / "extension" / "sheet.png")
    side_by_side: Tensor = torch.cat([real, extended], dim=-1).transpose(0, 1)  # [F, 3, H, 2W]
    gif = write_gif(side_by_side, out / "extension" / "real-vs-extended.gif", fps=example["fps"])
    return {"sheet": str(sheet), "gif": str(gif), "known": int(example["known"]), "frames": int(real.shape[1]),
            "fps": example["fps"]}


def extension_section(result: dict[str, Any], out: Path) -> list[str]:
    """Markdown lines of the report's extension section (none when the run has no extension example)."""
    media = result.get("extension")
    if not media:
        return []
    m = result.get("metrics", {})

    def shown(name: str) -> str:
        value = m.get(name, {}).get("value")
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    new = media["frames"] - media["known"]
    return ["## Extension (↑F extrapolation)", "",
            f"↑F extended held-out real clips by {new} frames from their first {media['known']} "
            f"({media['fps']:g} fps): the object's centroid is {shown('extend/centroid_error_px')} px from the real "
            f"continuation's, against {shown('extend/constant_velocity_px')} px for the constant-velocity guess; "
            f"PSNR {shown('extend/psnr')} dB (holding the last frame: {shown('extend/hold_last_psnr')} dB).", "",
            f"Top: a real clip; bottom: its first {media['known']} frames, extended by ↑F — "
            f"[gif (real | extended)]({Path(media['gif']).relative_to(out)})", "",
            f"![a real clip and ↑F's extension of its first {media['known']} frames]"
            f"({Path(media['sheet']).relative_to(out)})", ""]
