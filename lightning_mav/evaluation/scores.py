"""``EvalMetrics``: every score of an evaluation run, as torchmetrics (summed states, so DDP is exact)."""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric, SumMetric

from lightning_mav.evaluation.prompts import is_shapes_prompt
from lightning_mav.metrics import (
    CLIPSIM,
    ExtrapolationScore,
    FrechetVideoDistance,
    ShapesFaithfulness,
    TemporalCoherence,
    VideoInceptionScore,
)
from lightning_mav.metrics.ghosting import GHOST_EXCESS, GHOST_LIMIT, interpolation_objects, video_ghost_rate
from lightning_mav.metrics.intervals import UnitMeans, wilson_interval
from lightning_mav.metrics.objects import ObjectCounts
from lightning_mav.metrics.sharpness import sr_edges

NO_I3D = "not computed: no I3D weights (--i3d PATH)"
NO_C3D = "not computed: no C3D weights (--c3d PATH)"

_COHERENCE = ("D_t", "up_F", "D_per_frame")
_PSNR = ("up_F", "SR_l", "SR_t", "SR_h")
_OBJECTS = ("D_t", "final", "real")
_INTERP_OBJECTS = ("ghost_rate", "blend_ghost_rate", "centroid_error", "blend_centroid_error")
_SR_EDGES = ("sharpness", "bicubic_sharpness", "grain", "bicubic_grain", "real_grain")


class EvalMetrics(nn.Module):
    """Every score of an evaluation run, as torchmetrics (summed states: exact under DDP through their sync).

    Args:
        clip: the suite's CLIP (``pipe.C_x``) for CLIPSIM.
        i3d: local I3D weights for FVD (a path, or a feature network); None: no FVD.
        fvd_samples: FVD's videos per side (2048, the usual protocol; None counts all).
        c3d: local C3D weights (UCF-101) for the video Inception Score (a path, or the network); None: no IS.
        is_splits: the Inception Score's splits (10 in the protocol; it needs a video per split at least).
        protocol_clip: a CLIP of the protocol's (MSR-VTT: ViT-B/32), independent of the suite's C_x: CLIPSIM on the
            paper's scale as ``clipsim/<its model name>``; None: only the suite's.

    ``update_generated(Generated-like frames, prompts)``, ``update_fvd_real(videos)``, ``update_real_motion(videos)``,
    ``update_psnr(stage, scores, n)``; :meth:`results` -> ``{name: {"value": float | str, "about": str}}``.
    """

    def __init__(self, clip: nn.Module, *, i3d: str | Path | nn.Module | None = None,
                 fvd_samples: int | None = 2048, c3d: str | Path | nn.Module | None = None, is_splits: int = 10,
                 protocol_clip: nn.Module | None = None) -> None:
        super().__init__()
        self.faithfulness = ShapesFaithfulness()
        self.faithfulness_per_frame = ShapesFaithfulness()  # the ablation's: is a miss D's (text->image) or D_t's?
        self.coherence = nn.ModuleDict({name: TemporalCoherence() for name in _COHERENCE})
        self.coherence_real = TemporalCoherence()  # real clips at D_t's fps and size: the reference for motion
        self.not_shapes = SumMetric()  # prompts the shapes metrics cannot score
        self.clipsim = CLIPSIM(clip)
        self.clip_name = str(getattr(clip, "model_name", type(clip).__name__))
        self.fvd = None if i3d is None else FrechetVideoDistance(i3d, max_samples=fvd_samples)
        self.video_is = None if c3d is None else VideoInceptionScore(c3d, splits=is_splits)
        self.protocol_clipsim = None if protocol_clip is None else CLIPSIM(protocol_clip)
        self.protocol_clip_name = str(getattr(protocol_clip, "model_name", type(protocol_clip).__name__))
        self.psnr = nn.ModuleDict({stage: nn.ModuleDict({"ours": MeanMetric(), "baseline": MeanMetric()})
                                   for stage in _PSNR})
        # per item (clip / image) PSNR gain over the baseline: its 95% interval tells a change from noise
        self.psnr_gain = nn.ModuleDict({stage: UnitMeans(("gain",)) for stage in _PSNR})
        self.shape_videos = SumMetric()  # videos the shapes metrics scored: the n of their intervals
        self.real_videos = SumMetric()
        self.objects = nn.ModuleDict({name: ObjectCounts() for name in _OBJECTS})  # clean objects, flecks, noise
        self.up_F_ghosts = UnitMeans(("ghost_rate",), rates=("ghost_rate",))  # ↑F's frames in generated videos
        self.interp_objects = UnitMeans(_INTERP_OBJECTS, rates=("ghost_rate", "blend_ghost_rate"))
        self.sr_edges = nn.ModuleDict({stage: UnitMeans(_SR_EDGES) for stage in _PSNR if stage != "up_F"})
        self.extension = ExtrapolationScore()  # ↑F extending real clips (evaluation/extension.py)
        self.extension_example: dict[str, Any] | None = None  # one extended clip for the report

    # ------------------------------------------------------------------ updates
    def update_generated(self, frames: dict[str, Tensor], prompts: Sequence[str], *, final: str,
                         skip: int = 5) -> None:
        """Score a batch of generated samples: ``frames[name]`` ``[B, 3, F, H, W]`` in [-1, 1] (see ``Generated``)."""
        shapes = [is_shapes_prompt(p) for p in prompts]
        self.not_shapes.update(float(len(shapes) - sum(shapes)))
        if all(shapes):
            self.shape_videos.update(float(len(prompts)))
            self.faithfulness.update(frames["D_t"], prompts)
            if "D_per_frame" in frames:
                self.faithfulness_per_frame.update(frames["D_per_frame"], prompts)
            for name in _COHERENCE:
                if name in frames:
                    self.coherence[name].update(frames[name])
            self.objects["D_t"].update(frames["D_t"])
            self.objects["final"].update(frames[final])
            if "up_F" in frames:
                self.up_F_ghosts.update({"ghost_rate": video_ghost_rate(frames["up_F"], skip)})
        self.clipsim.update(frames[final], prompts)
        if self.protocol_clipsim is not None:
            self.protocol_clipsim.update(frames[final], prompts)
        at_dt_times = fvd_frames(frames[final], skip if "up_F" in frames else 1)
        if self.fvd is not None:
            self.fvd.update(at_dt_times, real=False)
        if self.video_is is not None:
            self.video_is.update(at_dt_times.to(self.video_is.device))

    def update_fvd_real(self, videos: Tensor) -> None:
        """Real clips ``[B, 3, F, H, W]`` for FVD's reference side."""
        if self.fvd is not None:
            self.fvd.update(videos.to(self.fvd.device), real=True)  # I3D runs where the metric lives

    def update_real_motion(self, videos: Tensor) -> None:
        """Real clips ``[B, 3, F, H, W]`` at D_t's frame count, fps and size: coherence and speed of real objects."""
        self.coherence_real.update(videos)
        self.real_videos.update(float(len(videos)))
        self.objects["real"].update(videos)

    def update_psnr(self, stage: str, scores: dict[str, Tensor], n: int) -> None:
        """One batch's ``interpolation_psnr`` / ``sr_psnr`` result, weighted by its ``n`` items (with ``gain_items``
        ``[n]``, the per-item gains, for the gain's interval)."""
        self.psnr[stage]["ours"].update(scores["psnr"].float(), weight=n)
        self.psnr[stage]["baseline"].update(scores["baseline_psnr"].float(), weight=n)
        if "gain_items" in scores:
            self.psnr_gain[stage].update({"gain": scores["gain_items"]})

    def update_interpolation_objects(self, pred: Tensor, target: Tensor, stride: int) -> None:
        """↑F's held-out frames ``pred`` vs real clips ``target`` ``[B, 3, F, H, W]``: ghosting and centroid error,
        beside the linear blend's (:func:`lightning_mav.metrics.ghosting.interpolation_objects`)."""
        self.interp_objects.update(interpolation_objects(pred, target, stride))

    def update_sr_edges(self, stage: str, pred: Tensor, target: Tensor, lowres: Tensor) -> None:
        """An SR stage's edge sharpness and grain beside bicubic's and the real frames' (``sharpness.sr_edges``)."""
        self.sr_edges[stage].update(sr_edges(pred, target, lowres))

    # ------------------------------------------------------------------ results
    def results(self, skipped: dict[str, str] | None = None) -> dict[str, dict[str, float | str]]:
        """``{name: {"value", "about"}}``; ``skipped`` maps ``"up_F"``/``"SR_t"``/... to why they have no score.

        Every rank must call this (the computes synchronise); which metrics are computed depends only on
        ``skipped`` and on synchronised counts, so all ranks take the same path.
        """
        skipped = dict(skipped or {})
        out: dict[str, dict[str, float | str]] = {}

        def put(name: str, value: Any, about: str, reason: str | None = None, interval: Any = None) -> None:
            if reason is None and value is not None and not math.isfinite(float(value)):
                reason = "not computed: no samples"
            out[name] = {"value": reason if reason is not None else float(value), "about": about}
            if reason is None and interval is not None and all(math.isfinite(float(v)) for v in interval):
                out[name]["interval"] = [float(interval[0]), float(interval[1])]  # 95%

        def rate(value: Any, n: float) -> tuple[float, float] | None:
            """Wilson's 95% interval of a mean of per-unit values in [0, 1] over ``n`` units (videos, clips)."""
            v = float(value)
            return wilson_interval(min(max(v, 0.0), 1.0) * n, n) if n > 0 and math.isfinite(v) else None

        def put_mean(name: str, scores: dict[str, Tensor], about: str, reason: str | None = None) -> None:
            """A ``UnitMeans`` quantity with its interval."""
            put(name, None if reason else scores["mean"], about, reason,
                None if reason else (scores["low"], scores["high"]))

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            not_shapes = int(self.not_shapes.compute())
            shapes_reason = (f"not computed: {not_shapes} prompt(s) are not Moving Shapes prompts" if not_shapes
                             else None)
            videos = float(self.shape_videos.compute())
            real_n = float(self.real_videos.compute())
            faith = self.faithfulness.compute()
            where = "of D_t's frames (before ↑F and SR)"
            for key, about in (("color", f"fraction {where} whose object has the prompt's colour (chance 1/8)"),
                               ("shape", f"fraction {where} whose object has the prompt's shape (chance 1/3)"),
                               ("size", f"fraction {where} whose object has the prompt's size (chance 1/3)"),
                               ("all", f"fraction {where} with colour, shape and size all right")):
                put(f"shapes/{key}", faith[key], about, shapes_reason, rate(faith[key], videos))
            faith_d = self.faithfulness_per_frame.compute()
            for key in ("color", "shape", "size"):
                put(f"shapes/D_per_frame/{key}", faith_d[key],
                    f"ablation: shapes/{key} of D per frame (same prompts, y_e and noise): where D_t's frames lose "
                    f"the prompt's {key}, D (text -> image) or the temporal fine-tuning", shapes_reason,
                    rate(faith_d[key], videos))
            coherence = {name: self.coherence[name].compute() for name in _COHERENCE}
            put("coherence/D_t", coherence["D_t"]["coherence"],
                "temporal coherence of D_t's frames, 0-1: one object, stable colour and area, smooth path, moving, "
                "steady background", shapes_reason, rate(coherence["D_t"]["coherence"], videos))
            put("coherence/D_t/smoothness", coherence["D_t"]["smoothness"],
                "fraction of D_t's inner frames whose object path has no jump", shapes_reason,
                rate(coherence["D_t"]["smoothness"], videos))
            put("coherence/D_t/background", coherence["D_t"]["background_stability"],
                "fraction of D_t's frames whose background matches the video's (no switch or fade between the "
                "data's black, gray and white)", shapes_reason, rate(coherence["D_t"]["background_stability"], videos))
            put("coherence/D_per_frame", coherence["D_per_frame"]["coherence"],
                "ablation: D per frame (D_t's U-Net, time=False; same prompts, y_e and noise) scored like D_t",
                shapes_reason, rate(coherence["D_per_frame"]["coherence"], videos))
            put("coherence/D_per_frame/smoothness", coherence["D_per_frame"]["smoothness"],
                "ablation: smoothness of D per frame (an image model redraws the position every frame)",
                shapes_reason, rate(coherence["D_per_frame"]["smoothness"], videos))
            put("coherence/gain", coherence["D_t"]["coherence"] - coherence["D_per_frame"]["coherence"],
                "coherence of D_t minus D per frame: what the temporal layers add (the paper's claim: > 0)",
                shapes_reason)
            put("coherence/up_F", coherence["up_F"]["coherence"],
                "temporal coherence of ↑F's interpolated frames (before SR)", skipped.get("up_F") or shapes_reason,
                rate(coherence["up_F"]["coherence"], videos))
            real_reason = shapes_reason or skipped.get("real")
            real = None if real_reason else self.coherence_real.compute()
            put("coherence/real", None if real is None else real["coherence"],
                "temporal coherence of real validation clips (D_t's frame count, fps and size): the ceiling on this data",
                real_reason, None if real is None else rate(real["coherence"], real_n))
            speed = "median step of the object's centroid between frames (fraction of the frame side)"
            put("motion/D_t/speed", coherence["D_t"]["speed"], f"{speed} in D_t's frames", shapes_reason)
            put("motion/real/speed", None if real is None else real["speed"],
                f"{speed} in real validation clips at the same fps", real_reason)
            put("motion/speed_ratio", None if real is None else coherence["D_t"]["speed"] / real["speed"],
                "motion/D_t/speed over motion/real/speed: 1 when D_t's objects move as fast as real ones, < 1 slower",
                real_reason)
            self._object_results(put, put_mean, shapes_reason, real_reason, skipped)

            clip_about = (f"CLIPSIM (mean cosine of frame and prompt) of the final frames with the suite's own CLIP "
                          f"({self.clip_name}, the C_x P was trained with) - not ViT-B/32, not the paper's scale")
            try:
                put("clipsim/suite_clip", self.clipsim.compute(), clip_about)
            except RuntimeError:
                put("clipsim/suite_clip", None, clip_about, "not computed: no samples")

            if self.protocol_clipsim is not None:
                about = (f"CLIPSIM (mean over videos of the mean cosine of frame and prompt) of the final frames with "
                         f"{self.protocol_clip_name}: the paper's scale with ViT-B/32 (MSR-VTT: 0.3049)")
                try:
                    put(f"clipsim/{self.protocol_clip_name}", self.protocol_clipsim.compute(), about)
                except RuntimeError:
                    put(f"clipsim/{self.protocol_clip_name}", None, about, "not computed: no samples")

            is_about = "video Inception Score (UCF-101 C3D) of the final videos at D_t's frame times; higher is better"
            if self.video_is is None:
                put("is", None, is_about, NO_C3D)
            else:
                try:
                    report = self.video_is.report()
                    put("is", report["is"], f"{is_about}; C3D {report['weights_source']} ({report['num_videos']} "
                                            f"videos, {report['splits']} splits)")
                    put("is/std", report["is_std"], "standard deviation of IS over its splits")
                except (RuntimeError, ValueError) as e:
                    put("is", None, is_about, f"not computed: {e}")

            fvd_about = "FVD of the final videos (D_t's frame times) against real validation clips; lower is better"
            if self.fvd is None:
                put("fvd", None, fvd_about, skipped.get("fvd", NO_I3D))
            else:
                try:
                    report = self.fvd.report()
                    put("fvd", report["fvd"], f"{fvd_about}; I3D {report['weights_source']} "
                                              f"({report['num_real']} real, {report['num_fake']} generated)")
                    put("fvd/num_real", report["num_real"], "real videos in FVD")
                    put("fvd/num_generated", report["num_fake"], "generated videos in FVD")
                except RuntimeError as e:
                    put("fvd", None, fvd_about, skipped.get("fvd") or f"not computed: {e}")

            names = {"up_F": ("interp", "↑F on held-out frames of real clips", "linear blend of the kept frames"),
                     "SR_l": ("sr/SR_l", "SR_l on real validation images", "bicubic upsampling"),
                     "SR_t": ("sr/SR_t", "SR_t on real validation clips", "bicubic upsampling"),
                     "SR_h": ("sr/SR_h", "SR_h on real validation images", "bicubic upsampling")}
            for stage, (prefix, what, baseline) in names.items():
                reason = skipped.get(stage) or skipped.get(f"{stage}/data")
                ours = None if reason else self.psnr[stage]["ours"].compute()
                base = None if reason else self.psnr[stage]["baseline"].compute()
                base_name = "linear_blend_psnr" if stage == "up_F" else "bicubic_psnr"
                put(f"{prefix}/psnr", ours, f"PSNR (dB) of {what}", reason)
                put(f"{prefix}/{base_name}", base, f"PSNR (dB) of the {baseline} on the same frames", reason)
                gain = None if reason else self.psnr_gain[stage].compute()["gain"]
                put(f"{prefix}/gain", None if reason else ours - base,
                    f"{prefix}/psnr minus {prefix}/{base_name} (dB): > 0 when {stage} beats the {baseline}; the "
                    f"interval over the {'clips' if stage in ('up_F', 'SR_t') else 'images'}", reason,
                    None if gain is None else (gain["low"], gain["high"]))
            out.update(self.extension_results(skipped.get("up_F") or skipped.get("extend/data")))
        return out

    def extension_results(self, reason: str | None) -> dict[str, dict[str, float | str]]:
        """``extend/*``: ↑F extending held-out real clips (docs/evaluation.md); ``reason`` why not computed."""
        scores = None if reason else self.extension.compute()
        where = "over the extended frames of real clips (first half of ↑F's window known)"
        abouts = {
            "centroid_error_px": f"mean distance (px at ↑F's size) of the object's centroid in ↑F's extension from "
                                 f"the real continuation's, {where}",
            "constant_velocity_px": "the same for the constant-velocity guess (the last known centroid moved on by "
                                    "the last step), on the same frames",
            "detected": "fraction of extended frames with a real object in which ↑F's frame has one too",
            "psnr": f"PSNR (dB) of ↑F's extended frames vs the real ones, {where}",
            "hold_last_psnr": "PSNR (dB) of the last known frame held (the video that stops) on the same frames",
        }
        out: dict[str, dict[str, float | str]] = {}
        for key, about in abouts.items():
            value = None if scores is None else float(scores[key])
            if reason is None and (value is None or not math.isfinite(value)):
                value, why = None, "not computed: no scored frames"
            else:
                why = reason
            out[f"extend/{key}"] = {"value": why if value is None else value, "about": about}
        if all(isinstance(out[f"extend/{k}"]["value"], float) for k in ("centroid_error_px", "constant_velocity_px")):
            gain = out["extend/constant_velocity_px"]["value"] - out["extend/centroid_error_px"]["value"]
        else:
            gain = out["extend/centroid_error_px"]["value"]  # the reason it is missing
        out["extend/gain_px"] = {"value": gain, "about": "extend/constant_velocity_px minus extend/centroid_error_px: "
                                                         "> 0 when ↑F continues the path better than the guess"}
        return out

    def _object_results(self, put: Any, put_mean: Any, shapes_reason: str | None, real_reason: str | None,
                        skipped: dict[str, str]) -> None:
        """Clean objects (D_t, final, real), ghosting and centroid error of ↑F, SR edges and grain."""
        where = {"D_t": ("D_t's frames", shapes_reason),
                 "final": ("the final frames (after ↑F and SR)", shapes_reason),
                 "real": ("real validation clips at D_t's size (30% of them hold two objects by design)", real_reason)}
        for name, (what, reason) in where.items():
            scores = None if reason else self.objects[name].compute()
            get = (lambda key: None) if scores is None else scores.get
            generated = name != "real"  # the real rows are the reference the generated ones are read against
            put_mean(f"objects/{name}/one_object", get("one_object"),
                     f"fraction of {what} holding exactly one object (a component >= 0.5% of the frame)"
                     + ("; target >= 0.95 (every prompt asks for one object)" if generated else ""), reason)
            put_mean(f"objects/{name}/flecks", get("flecks"),
                     f"flecks (components < 0.5% of the frame) per frame in {what}", reason)
            put_mean(f"objects/{name}/strays", get("strays"), f"objects beyond the first per frame in {what}", reason)
            put_mean(f"objects/{name}/background_std", get("background_std"),
                     f"std of the background pixels (0..255) in {what}"
                     + ("; compare with objects/real/background_std" if generated else ""), reason)
        reason = skipped.get("up_F") or shapes_reason
        put_mean("ghosts/up_F", None if reason else self.up_F_ghosts.compute()["ghost_rate"],
                 f"fraction of ↑F's in-between frames (generated videos) ghosted: ghost fraction > {GHOST_LIMIT} "
                 "(two half-transparent copies instead of one object; no reference frame)", reason)
        reason = skipped.get("up_F") or skipped.get("up_F/data")
        scores = None if reason else self.interp_objects.compute()
        about = {
            "ghost_rate": f"fraction of ↑F's held-out frames of real clips ghosted (ghost fraction > the real frame's "
                          f"+ {GHOST_EXCESS})",
            "blend_ghost_rate": "the same for the linear blend of the kept frames (~0.5 at stride 5: its 2nd and 3rd "
                                "in-between frames)",
            "centroid_error": "mean distance (pixels at ↑F's size) between the object's centroid (largest component "
                              "at least half opaque) in ↑F's held-out frames and in the real frames",
            "blend_centroid_error": "the same for the linear blend (its visible object stays at the nearer kept "
                                    "frame); ↑F should be below it"}
        for key in _INTERP_OBJECTS:
            put_mean(f"interp/{key}", None if scores is None else scores[key], about[key], reason)
        for stage, metric in self.sr_edges.items():
            reason = skipped.get(stage) or skipped.get(f"{stage}/data")
            scores = None if reason else metric.compute()
            for key, about in (
                    ("sharpness", f"{stage}'s mean gradient on the real frames' edges over the real one (1: as sharp "
                                  "as real); must beat bicubic_sharpness"),
                    ("bicubic_sharpness", "the same for bicubic upsampling of the same input"),
                    ("grain", f"{stage}'s grain on the real frames' flat areas (std of a 3x3 high-pass as white "
                              "noise, 0..255); compare with real_grain"),
                    ("bicubic_grain", "the same for bicubic upsampling"),
                    ("real_grain", "the same for the real frames (codec noise)")):
                put_mean(f"sr/{stage}/{key}", None if scores is None else scores[key], about, reason)


def fvd_frames(video: Tensor, skip: int) -> Tensor:
    """The final frames at D_t's frame times (every ``skip``-th after ↑F): FVD's usual 16 frames, not 76."""
    return video[:, :, ::skip]
