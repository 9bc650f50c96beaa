"""``EvalOptions``: every option of an evaluation run, defined once for the Python API (:func:`evaluate`), the
command (``mav evaluate``: one flag per field, the field's ``help`` its help) and the Lightning test entry
(``EvaluationModule(options=...)``, ``experiments/eval.yaml``)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from lightning_mav.evaluation.prompts import UCF101_TEMPLATE
from lightning_mav.evaluation.protocols import UCF101_NUM_VIDEOS
from lightning_mav.evaluation.real_data import RealData
from lightning_mav.pipeline import DEVICE_HELP, DTYPE_HELP, DTYPES, GenerationSettings


@dataclass(frozen=True)
class EvalOptions(GenerationSettings):
    """The pipeline's options (:class:`GenerationSettings`: num_frames, fps, skip, steps, guidance, stop_after) and
    what to generate for, what to score against and where to write."""

    protocol: str | None = field(default=None, metadata={
        "help": "a paper benchmark: ucf101 (--classes classInd.txt, FVD with --i3d, IS with --c3d, real clips from "
                "the UCF-101 folder in --real-videos) or msrvtt (--prompts test captions, CLIPSIM with --clipsim-model "
                "and --clipsim-weights); default: the Moving Shapes evaluation",
        "choices": ("ucf101", "msrvtt")})
    runs: str = field(default="runs", metadata={"help": "run folders holding <stage>/checkpoints/last.ckpt"})
    data: str = field(default="data/shapes", metadata={
        "help": "Moving Shapes root (default prompts, real validation shards)"})
    out: str = field(default="runs/eval", metadata={"help": "samples, videos, sheets, tb/ and metrics.json"})
    prompts: str | None = field(default=None, metadata={
        "help": "prompt file (.txt / .jsonl) or caption shards (.tar pattern); default DATA/eval/prompts.jsonl"})
    classes: str | None = field(default=None, metadata={
        "help": "class list file (UCF-101 classInd.txt style): one prompt per class"})
    template: str = field(default=UCF101_TEMPLATE, metadata={"help": "prompt template for --classes"})
    num_prompts: int | None = field(default=None, metadata={
        "help": "a seeded subset of the prompts (msrvtt: the first N captions)"})
    num_videos: int = field(default=UCF101_NUM_VIDEOS, metadata={
        "help": "ucf101: videos to generate, spread over the classes"})
    class_split: str | None = field(default=None, metadata={
        "help": "ucf101: a split list (trainlist01.txt) whose class frequencies the videos follow; default even"})
    videos_per_prompt: int = field(default=1, metadata={"help": "samples per prompt (different noise)"})
    seed: int = field(default=0, metadata={"help": "generation seed (a batch is seeded with seed + its first index)"})
    batch_size: int = field(default=4, metadata={"help": "prompts per pipeline call (part of every sample's key)"})
    i3d: str | None = field(default=None, metadata={
        "help": "local I3D weights for FVD (pytorch-i3d state dict or StyleGAN-V TorchScript); none: no FVD"})
    real_videos: str | None = field(default=None, metadata={
        "help": "real video shards for FVD, ↑F and SR_t (default DATA/videos/val-*.tar); ucf101: the UCF-101 folder "
                "(<ClassName>/*.avi)"})
    real_split: str | None = field(default=None, metadata={
        "help": "ucf101: the split list whose videos are FVD's real side (trainlist01.txt); default every video"})
    c3d: str | None = field(default=None, metadata={
        "help": "local C3D weights for the video Inception Score (StyleGAN-V's TorchScript c3d_ucf101.pt)"})
    is_splits: int = field(default=10, metadata={"help": "splits of the Inception Score (the protocol's: 10)"})
    clipsim_model: str | None = field(default=None, metadata={
        "help": "an open_clip model for CLIPSIM on the paper's scale (ViT-B-32), besides the suite's CLIP"})
    clipsim_weights: str | None = field(default=None, metadata={"help": "local weights file of --clipsim-model"})
    stats_cache: str | None = field(default="runs/real_stats", metadata={
        "help": "folder of cached real FVD statistics (keyed by detector, size, frames and clip sampling); "
                "none: recompute every run"})
    real_images: str | None = field(default=None, metadata={
        "help": "real image shards for SR_l / SR_h (default DATA/images/val-*.tar)"})
    eval_clips: int = field(default=16, metadata={
        "help": "real clips / images per PSNR score and for the real motion reference"})
    fvd_videos: int = field(default=2048, metadata={"help": "real clips for FVD (at most)"})
    fps_pair_prompts: int = field(default=0, metadata={
        "help": "the fps check: D_t samples the first N prompts at fps 4 and 24 with the same noise (speeds, their "
                "ratio, sheets side by side); 0: off"})
    quick: bool = field(default=False, metadata={
        "help": "2 sampling steps (unless --steps), at most 2 prompts, 2 clips per score (checks the plumbing)"})
    processes: int = field(default=1, metadata={
        "help": "generation processes, each with every n-th batch (on CUDA one GPU each, cuda:0..n-1); the samples "
                "are the same as one process makes"})
    device: str | None = field(default=None, metadata={"help": DEVICE_HELP})
    dtype: str = field(default="auto", metadata={"help": DTYPE_HELP, "choices": DTYPES})
    progress: bool = field(default=True, metadata={"help": "no progress bar"})

    def __post_init__(self) -> None:
        super().__post_init__()
        needs = {"ucf101": ("classes", "UCF-101's classInd.txt"), "msrvtt": ("prompts", "MSR-VTT's test captions")}
        if self.protocol is not None:
            if self.protocol not in needs:
                raise ValueError(f"protocol: expected one of {', '.join(needs)}, got {self.protocol!r}")
            key, what = needs[self.protocol]
            if getattr(self, key) is None:
                raise ValueError(f"{key}: --protocol {self.protocol} needs {what} (--{key} FILE)")
            if self.videos_per_prompt != 1:
                raise ValueError(f"videos_per_prompt: --protocol {self.protocol} makes one video per prompt")
        if (self.clipsim_model is None) != (self.clipsim_weights is None):
            raise ValueError("clipsim_model, clipsim_weights: give both (an open_clip name and its local weights file)")

    @property
    def settings(self) -> GenerationSettings:
        """The pipeline's options alone (what every sample's key records); ``quick`` means 2 steps."""
        own = {f.name: getattr(self, f.name) for f in fields(GenerationSettings)}
        if self.quick and self.steps is None:
            own["steps"] = 2
        return GenerationSettings(**own)

    @property
    def real(self) -> RealData:
        """Where the real validation data is and how much of it to score."""
        clips, fvd = (min(self.eval_clips, 2), min(self.fvd_videos, 8)) if self.quick else \
            (self.eval_clips, self.fvd_videos)
        return RealData(videos=self.real_videos or str(Path(self.data) / "videos" / "val-*.tar"),
                        images=self.real_images or str(Path(self.data) / "images" / "val-*.tar"),
                        clips=clips, fvd_videos=fvd, batch_size=self.batch_size, split=self.real_split,
                        stats_cache=self.stats_cache)

    @property
    def prompt_count(self) -> int | None:
        """``num_prompts``, at most 2 when ``quick``."""
        return min(self.num_prompts or 2, 2) if self.quick else self.num_prompts
