"""Measurement helpers shared by the benchmarks: clocks, the fp32 GEMM reference rate, FLOP counting, peak memory,
machine description, markdown tables and the RESULTS.md section writer.

Why these choices (the benchmark machine is a 2-core VM shared with other jobs, load 4-7):

- Every timing records both wall time (``perf_counter``) and this process's CPU time (``process_time``, all its
  threads). With one thread CPU time is what the work costs whatever the load; wall time is what a user waits.
  Models are interleaved round by round and medians reported, so a burst of load hits all of them alike.
- The reference rate is a large fp32 matmul measured in the same run, between the rounds, with the same thread
  count: "% of GEMM" is then a property of the code, not of how busy the machine was.
- Peak memory: the peak of live tensor memory during one step, from the profiler's allocation/free events (exact
  and independent of the C allocator; the process's RSS high-water mark was tried first and rejected: glibc's free
  lists and dynamic mmap threshold made it overstate live memory by hundreds of MiB and hide checkpointing's gain).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from lightning_mav.malloc import keep_freed_memory
from lightning_mav.nn.mixed_precision import cpu_bf16_isa

RESULTS = Path(__file__).with_name("RESULTS.md")
EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
MiB = 1024 * 1024


# ------------------------------------------------------------------------------------------------- threads and clocks
def configure_threads(threads: int) -> int:
    """Use ``threads`` intra-op threads (and as many inter-op); returns the count in effect."""
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


@dataclass
class Timing:
    """Wall and CPU seconds of repeated measurements of one thing."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def add(self, wall: float, cpu: float) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)

    @property
    def wall_median(self) -> float:
        return statistics.median(self.wall) if self.wall else float("nan")

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu) if self.cpu else float("nan")


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Run ``fn`` once: (wall seconds, CPU seconds of this process, its result)."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w0, time.process_time() - c0, out


# ------------------------------------------------------------------------------------------------- GEMM reference rate
def gemm_rate(n: int = 2048, reps: int = 3, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """``[n, n] @ [n, n]`` rate in ``dtype`` (fp32 by default) with the current threads: (best GFLOP/s of wall time,
    best GFLOP per CPU-s).

    The best of ``reps`` (after a warm-up) is the machine's attainable rate at that moment; the caller takes the
    median over the run's rounds.
    """
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: MKL buffers, page faults
    flop = 2.0 * n ** 3
    best_wall = best_cpu = 0.0
    for _ in range(reps):
        wall, cpu, _ = timed(lambda: a @ b)
        best_wall, best_cpu = max(best_wall, flop / wall / 1e9), max(best_cpu, flop / max(cpu, 1e-9) / 1e9)
    return best_wall, best_cpu


# ------------------------------------------------------------------------------------------------- FLOPs
def count_flops(fn: Callable[[], Any]) -> float:
    """GFLOP counted by ``torch.utils.flop_counter.FlopCounterMode`` while ``fn`` runs (matmuls, convolutions,
    attention; elementwise ops are not counted). Run ``fn`` on meta tensors to count without computing."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


# ------------------------------------------------------------------------------------------------- memory
def peak_allocated_mib(fn: Callable[[], Any]) -> float:
    """Peak of the tensor memory allocated (and not yet freed) while ``fn`` runs, in MiB, from the PyTorch
    profiler's allocation events (``profile_memory=True``): every allocation and free of the CPU allocator, in
    order, summed; memory held before ``fn`` (weights, optimizer moments) is not included. Exact, unlike the RSS,
    which the C allocator's free lists and fragmentation inflate. Slower than a plain run: time it separately."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / MiB


# ------------------------------------------------------------------------------------------------- machine
def machine() -> dict[str, Any]:
    """CPU model, core count, bf16 instructions, load average, versions: what RESULTS.md states about the run."""
    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        found = re.search(r"^Model name:\s+(.+)$", out, re.M)
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpu": model, "cores": os.cpu_count(), "bf16_isa": cpu_bf16_isa(), "load": tuple(round(x, 2) for x in load),
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def machine_line(info: dict[str, Any], load_seen: Sequence[float] = ()) -> str:
    """One markdown line describing the machine and the load during the run."""
    seen = list(load_seen) or [info["load"][0]]
    load = f"{min(seen):.1f}-{max(seen):.1f}" if load_seen else f"{seen[0]:.1f}"
    # the benchmark itself keeps `threads` cores busy: only load beyond that is someone else's
    shared = ": the machine was shared" if max(seen) > info["threads"] + 0.5 else ""
    return (f"{info['date']}, {info['cpu']}, {info['cores']} cores (load average {load} while measuring{shared}), "
            f"torch {info['torch']}, Python {info['python']}, {info['threads']} intra-op thread(s).")


# ------------------------------------------------------------------------------------------------- demo configs
def init_args(name: str) -> dict[str, Any]:
    """``model.init_args`` of ``experiments/<name>.yaml`` (the demo-sized stage configs)."""
    import yaml

    return dict(yaml.safe_load((EXPERIMENTS / f"{name}.yaml").read_text())["model"]["init_args"])


def demo_dt_unet() -> dict[str, Any]:
    """The demo D_t U-Net: D's config (decoder.yaml) updated with D_t's changes (dt.yaml), CLIP embedding width."""
    from lightning_mav.nn.clip import resolve_config

    unet = {**init_args("decoder")["unet"], **init_args("dt")["unet"]}
    unet.setdefault("image_embed_dim", resolve_config("mav-tiny")["embed_dim"])
    return unet


# ------------------------------------------------------------------------------------------------- paper configs
#: each child stage's parent (``init_from``): its U-Net is the parent's updated with the child's ``unet`` changes
PARENTS = {"dt": "decoder", "interp": "dt", "sr_t": "sr_l"}


def paper_init_args(name: str) -> dict[str, Any]:
    """``model.init_args`` of ``experiments/<name>.yaml`` with ``experiments/paper/<name>.yaml`` over it, the U-Net
    resolved through the ``init_from`` chain (D_t: D's U-Net + ``temporal``/``fps_cond``; ↑F: D_t's; SR_t: SR_l's +
    ``temporal``): the network a paper-scale run of that stage trains."""
    import yaml

    def load(path: Path) -> dict[str, Any]:
        return (yaml.safe_load(path.read_text()).get("model") or {}).get("init_args") or {}

    # an overlay's dict (unet, diffusion) replaces the base's whole, as jsonargparse does on the command line
    args = {**load(EXPERIMENTS / f"{name}.yaml"), **load(EXPERIMENTS / "paper" / f"{name}.yaml")}
    if name in PARENTS:
        args["unet"] = {**paper_init_args(PARENTS[name])["unet"], **(args.get("unet") or {})}
    return args


# ------------------------------------------------------------------------------------------------- output
def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A markdown table; ``align`` is one char per column: ``l`` or ``r`` (default: first left, rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: float, digits: int = 2) -> str:
    """Fixed-point number, ``-`` for NaN/None."""
    if x is None or x != x:
        return "-"
    return f"{x:.{digits}f}"


def write_section(title: str, body: str, path: Path = RESULTS, after: str | None = None) -> None:
    """Replace the ``## title`` section of RESULTS.md (up to the next ``## `` heading), or add it: after the last
    section whose heading starts with ``after`` when there is one, else at the end. Every other section is kept."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
    siblings = list(re.finditer(rf"^{re.escape(after)}.*?(?=^## |\Z)", text, re.M | re.S)) if after else []
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text, count=1)
    elif siblings:
        end = siblings[-1].end()
        text = text[:end].rstrip("\n") + "\n\n" + block + "\n" + text[end:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text.rstrip("\n") + "\n")


def save_json(path: str | Path | None, data: Any) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1, default=str))


# ------------------------------------------------------------------------------------------------- CLI presets
def add_common_args(parser: argparse.ArgumentParser) -> None:
    """``--quick``/``--full`` presets, ``--threads``, ``--reps``, ``--write`` (RESULTS.md) and ``--json``."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smallest run (a smoke test of the numbers)")
    size.add_argument("--full", action="store_true", help="the reference configuration (long on a 2-core CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default 1: CPU time is then load-independent)")
    parser.add_argument("--reps", type=int, default=None, help="measured repetitions per case (after a warm-up)")
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of RESULTS.md")
    parser.add_argument("--json", default=None, help="also dump the raw measurements to this file")
    parser.add_argument("--from-json", default=None, help="re-render the report of an earlier --json dump (no run)")
    parser.add_argument("--malloc", choices=["default", "heap"], default="heap",
                        help="heap (the default): keep freed memory in glibc's heap, as the mav/lightning commands do "
                             "(lightning_mav.malloc); default: glibc's own defaults, what a plain Python script gets")


def apply_preset(args: argparse.Namespace, presets: dict[str, dict[str, Any]]) -> argparse.Namespace:
    """Fill every option left at ``None`` from the ``quick``/``default``/``full`` preset."""
    if getattr(args, "malloc", "heap") == "heap" and not getattr(args, "from_json", None):
        os.environ.pop("MAV_MALLOC", None)
        keep_freed_memory()
    preset = presets["quick" if args.quick else "full" if args.full else "default"]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def mode_flag(args: argparse.Namespace) -> str:
    return (" --quick" if args.quick else " --full" if args.full else "") + (
        " --malloc default" if getattr(args, "malloc", "heap") == "default" else "")


def heap_malloc(res: dict[str, Any]) -> bool:
    """Whether a result was measured with glibc keeping freed memory (``--malloc heap``, the default)."""
    return "--malloc default" not in res["command"]
