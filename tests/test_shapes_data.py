"""Moving Shapes generator: layout, determinism, rendering, captions, videos and the held-out prompts."""

from __future__ import annotations

import filecmp
import io
import json
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from datamodules import shapes
from lightning_mav.commands.data import main as data_command


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isreg()}


def _split(root: Path, kind: str, split: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for tar_path in sorted((root / kind).glob(f"{split}-*.tar")):
        out.update(_members(tar_path))
    return out


def test_layout_and_counts(shapes_root: Path) -> None:
    assert (shapes_root / "DONE").is_file()
    expected = {("images", "train"): 64, ("images", "val"): 16, ("videos", "train"): 16, ("videos", "val"): 8}
    for (kind, split), num in expected.items():
        tars = sorted((shapes_root / kind).glob(f"{split}-*.tar"))
        assert len(tars) == 8  # min_shards: enough for 2 ranks x 4 workers
        for tar_path in tars:  # img2dataset's side file, with the right count
            stats = json.loads(tar_path.with_name(tar_path.stem + "_stats.json").read_text())
            assert stats["successes"] == len({n.split(".")[0] for n in _members(tar_path)})
        members = _split(shapes_root, kind, split)
        keys = {name.split(".")[0] for name in members}
        assert len(keys) == num
        wanted_ext = {"png", "txt", "json"} if kind == "images" else {"mp4", "json"}  # videos: no captions
        for key in keys:
            assert {name.split(".", 1)[1] for name in members if name.startswith(key + ".")} == wanted_ext


def test_generation_is_deterministic_and_seeded(tmp_path: Path, shapes_root: Path) -> None:
    kwargs = dict(num_images=64, num_videos=16, num_val_images=16, num_val_videos=8, image_size=32, video_size=32)
    again = shapes.generate(tmp_path / "again", seed=0, **kwargs)
    for path in sorted(shapes_root.glob("*/*")):
        assert filecmp.cmp(path, again / path.relative_to(shapes_root), shallow=False), path
    other = shapes.generate(tmp_path / "other", seed=1, num_images=8, num_videos=1, num_val_images=1,
                            num_val_videos=1, image_size=32, video_size=32)
    assert _split(other, "images", "train") != _split(again, "images", "train")


def test_render_frame_geometry_and_palette() -> None:
    size = 40
    for shape in shapes.SHAPES:
        frame = shapes.render_frame(shape, "red", 16, (20, 20), size, "black")
        assert frame.shape == (size, size, 3) and frame.dtype == np.uint8
        assert tuple(frame[20, 20]) == shapes.COLORS["red"]  # centre is inside every shape
        assert tuple(frame[0, 0]) == shapes.BACKGROUNDS["black"]
        assert np.array_equal(frame, shapes.render_frame(shape, "red", 16, (20, 20), size, "black"))  # pure
    square = shapes.render_frame("square", "blue", 16, (20, 20), size)
    circle = shapes.render_frame("circle", "blue", 16, (20, 20), size)
    triangle = shapes.render_frame("triangle", (1, 2, 3), 16, (20, 20), size, (9, 9, 9))
    corner = (13, 13)  # inside the square's box, outside the circle
    assert tuple(square[corner]) == shapes.COLORS["blue"] and tuple(circle[corner]) != shapes.COLORS["blue"]
    assert tuple(triangle[13, 20]) == (1, 2, 3) and tuple(triangle[13, 14]) == (9, 9, 9)  # apex up, narrow top
    assert tuple(triangle[27, 13]) == (1, 2, 3)  # wide base
    areas = {s: int(shapes.shape_mask(s, 16, (20, 20), size).sum()) for s in shapes.SHAPES}
    assert areas["triangle"] < areas["circle"] < areas["square"] == 256


def test_bounce_stays_inside_and_reflects() -> None:
    positions = [shapes.bounce(5.0, 10.0, t / 10, 2.0, 12.0) for t in range(100)]
    assert min(positions) >= 2.0 and max(positions) <= 12.0
    assert shapes.bounce(5.0, 10.0, 0.7, 2.0, 12.0) == pytest.approx(12.0 - 0.0)  # hits the wall at t = 0.7
    assert shapes.bounce(5.0, 10.0, 0.9, 2.0, 12.0) == pytest.approx(10.0)  # and comes back


def test_images_match_captions_and_renderer(shapes_root: Path) -> None:
    members = _split(shapes_root, "images", "train")
    keys = sorted({name.split(".")[0] for name in members})
    for key in keys:
        meta = json.loads(members[f"{key}.json"])
        gt = meta["ground_truth"]
        caption = members[f"{key}.txt"].decode()
        assert caption == meta["caption"]
        assert f"{gt['color']} {gt['shape']}" in caption  # every template names colour and shape
        pixels = np.asarray(Image.open(io.BytesIO(members[f"{key}.png"])))
        expected = shapes.render_frame(gt["shape"], gt["color"], gt["size_px"], gt["center_xy"], 32, gt["background"])
        assert np.array_equal(pixels, expected)  # PNG is lossless: the metrics can re-render exactly


def test_eval_prompts_are_held_out_but_attributes_are_covered(shapes_root: Path) -> None:
    lines = (shapes_root / "eval" / "prompts.txt").read_text().splitlines()
    records = [json.loads(line) for line in (shapes_root / "eval" / "prompts.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == lines
    assert len(lines) == len(shapes.COLORS) * len(shapes.SHAPES)
    assert {(r["color"], r["shape"]) for r in records} == {(c, s) for c in shapes.COLORS for s in shapes.SHAPES}
    for r in records:
        assert tuple(r["color_rgb"]) == shapes.COLORS[r["color"]] and r["size"] in shapes.SIZES
    captions = {v.decode() for k, v in _split(shapes_root, "images", "train").items() if k.endswith(".txt")}
    assert not set(lines) & captions
    assert not any(word in c for c in captions for word in ("moving", "bouncing", "sliding"))
    # every colour/shape pair of the prompts occurs in training captions (64 images >= 24 pairs)
    for r in records:
        assert any(f"{r['color']} {r['shape']}" in c for c in captions), r


def test_videos_are_real_h264_with_metadata_and_ground_truth(shapes_root: Path) -> None:
    members = _split(shapes_root, "videos", "val")
    key = sorted(name.split(".")[0] for name in members)[0]
    meta = json.loads(members[f"{key}.json"])
    assert meta["fps"] in shapes.VIDEO_FPS and 2.0 <= meta["duration"] <= 4.0
    assert meta["num_frames"] == round(meta["duration"] * meta["fps"])
    assert "caption" not in meta and f"{key}.txt" not in members  # unlabeled
    with av.open(io.BytesIO(members[f"{key}.mp4"])) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and float(stream.average_rate) == meta["fps"]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(frames) == meta["num_frames"] and frames[0].shape == (32, 32, 3)
    gt = meta["ground_truth"]
    for t in (0, len(frames) // 2, len(frames) - 1):  # the shapes are where the ground truth says
        expected = shapes.render_video_frame(gt["objects"], t / meta["fps"], 32, gt["background"])
        assert np.abs(frames[t].astype(int) - expected).mean() < 12
    assert not np.array_equal(frames[0], frames[-1])  # they move


def test_half_written_dataset_is_regenerated_and_cli(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    (root / "images").mkdir(parents=True)
    (root / "images" / "train-000099.tar").write_bytes(b"partial")  # a crash left this, and no DONE
    assert not shapes.is_complete(root)
    data_command(["--out", str(root), "--small"])
    assert shapes.is_complete(root) and not (root / "images" / "train-000099.tar").exists()
    assert json.loads((root / "DONE").read_text())["image_size"] == 32
    with pytest.raises(ValueError, match="even"):
        shapes.generate(tmp_path / "odd", video_size=33)
