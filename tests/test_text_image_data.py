"""TextImageDataModule and image decoding: round trips, img2dataset shards, every bad input skipped and counted."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from datamodules.decode import SampleError, decode_caption, decode_image, to_float
from datamodules.skips import SkipTally
from datamodules.text_image import TextImageDataModule


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(w: int = 40, h: int = 40, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _meta(key: str) -> bytes:
    return json.dumps({"key": key, "status": "success", "url": f"https://example.com/{key}.jpg"}).encode()


def _write(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def _batches(dm: TextImageDataModule, loader: str = "val") -> list[dict]:
    dm.prepare_data()
    dm.setup("fit" if loader == "train" else "validate")
    return list(getattr(dm, f"{loader}_dataloader")())


def test_shapes_round_trip_exact_pixels(shapes_root: Path) -> None:
    dm = TextImageDataModule(root=str(shapes_root), image_size=32, batch_size=4, val_batch_size=5,
                             batches_per_epoch=3, shuffle_buffer=8)
    train = _batches(dm, "train")
    assert len(train) == 3
    for batch in train:
        assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
        assert batch["valid"].dtype == torch.bool and batch["valid"].all()
        assert len(batch["caption"]) == 4 and all(batch["caption"]) and len(batch["key"]) == 4
    val = list(dm.val_dataloader())
    keys = [k for b in val for k, v in zip(b["key"], b["valid"]) if v]
    assert len(keys) == len(set(keys)) == 16
    # pixels are exactly the PNG's, mapped to [-1, 1]
    first = val[0]
    raw = next(iter(wds.WebDataset(sorted(str(p) for p in (shapes_root / "images").glob("val-*.tar"))[0],
                                   shardshuffle=False)))
    png = torch.from_numpy(np.array(Image.open(io.BytesIO(raw["png"])))).permute(2, 0, 1)
    assert first["key"][0] == raw["__key__"]
    assert torch.equal(first["image"][0], to_float(png))
    assert first["caption"][0] == raw["txt"].decode()


def test_img2dataset_layout_every_bad_input_counted(tmp_path: Path) -> None:
    """Shards written by webdataset's TarWriter in img2dataset's layout, with one sample per failure mode."""
    ok = _rgb()
    gray16 = Image.fromarray(np.full((20, 30), 65535, dtype=np.uint16))
    assert gray16.mode.startswith("I")
    float_img = Image.fromarray(np.zeros((20, 20), dtype=np.float32))
    palette = _rgb().convert("P", palette=Image.Palette.ADAPTIVE)
    jpeg = _encode(ok, "JPEG", quality=90)
    good = {
        "jpg": {"jpg": jpeg}, "png": {"png": _encode(ok, "PNG")}, "webp": {"webp": _encode(ok, "WEBP")},
        "tall": {"jpg": _encode(_rgb(24, 60), "JPEG")},
    }
    repaired = {
        "gray": ({"png": _encode(ok.convert("L"), "PNG")}, "repaired_grayscale"),
        "rgba": ({"png": _encode(ok.convert("RGBA"), "PNG")}, "repaired_alpha"),
        "pal": ({"png": _encode(palette, "PNG")}, "repaired_palette"),
        "g16": ({"png": _encode(gray16, "PNG")}, "repaired_16bit"),
        "cmyk": ({"jpg": _encode(ok.convert("CMYK"), "JPEG")}, "repaired_mode"),
    }
    bad = {
        "garbage": ({"jpg": b"not an image at all", "txt": b"a caption"}, "decode_error"),
        "cut": ({"jpg": jpeg[: len(jpeg) // 2], "txt": b"a caption"}, "decode_error"),
        "zero": ({"jpg": b"", "txt": b"a caption"}, "zero_byte_member"),
        "float": ({"png": _encode(float_img, "TIFF"), "txt": b"a caption"}, "unsupported_image_mode"),
        "nocap": ({"jpg": jpeg}, "missing_caption"),
        "empty": ({"jpg": jpeg, "txt": b"  \n"}, "empty_caption"),
        "latin1": ({"jpg": jpeg, "txt": "café crème".encode("latin-1")}, "non_utf8_caption"),
        "failed": ({"txt": b"a caption"}, "missing_image"),  # img2dataset writes no image for failed downloads
    }
    samples = []
    for key, members in good.items():
        samples.append({"__key__": key, **members, "txt": f"caption {key}".encode(), "json": _meta(key)})
    for key, (members, _) in repaired.items():
        samples.append({"__key__": key, **members, "txt": f"caption {key}".encode(), "json": _meta(key)})
    for key, (members, _) in bad.items():
        samples.append({"__key__": key, **members, "json": _meta(key)})
    for i in range(0, len(samples), 5):
        _write(tmp_path / f"{i // 5:05d}.tar", samples[i:i + 5])
    (tmp_path / "00000.parquet").write_bytes(b"PAR1 side file: must be ignored")
    (tmp_path / "00000_stats.json").write_text(json.dumps({"successes": 5}))
    # a truncated shard: the first sample survives, the rest of the file is gone mid-member
    trunc = _write(tmp_path / "99999.tar", [{"__key__": "survivor", "jpg": jpeg, "txt": b"survives"},
                                            {"__key__": "lost", "jpg": jpeg, "txt": b"lost"}])
    with tarfile.open(trunc) as tar:
        cut = tar.getmember("lost.jpg").offset_data + len(jpeg) // 2
    trunc.write_bytes(trunc.read_bytes()[:cut])

    dm = TextImageDataModule(urls=str(tmp_path), val_urls=str(tmp_path), image_size=24, val_batch_size=4)
    batches = _batches(dm)
    tally = SkipTally()
    for batch in batches:
        tally.update(batch)
        assert batch["image"].shape == (4, 3, 24, 24)
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    valid = [k for b in batches for k, v in zip(b["key"], b["valid"]) if v]
    assert sorted(valid) == sorted([*good, *repaired, "survivor"])
    expected = {reason: 0 for reason in [*(r for _, r in repaired.values()), *(r for _, r in bad.values())]}
    for _, reason in [*repaired.values(), *bad.values()]:
        expected[reason] += 1
    expected["truncated_tar"] = 1
    assert tally.totals() == dict(sorted(expected.items()))
    captions = {k: c for b in batches for k, c in zip(b["key"], b["caption"])}
    assert captions["jpg"] == "caption jpg" and captions["survivor"] == "survives"


def test_mode_repairs_give_the_obvious_rgb() -> None:
    gray = Image.fromarray(np.full((8, 8), 100, np.uint8))
    img, repair = decode_image(_encode(gray, "PNG"), 8)
    assert repair == "repaired_grayscale" and img.shape == (3, 8, 8) and (img == 100).all()
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    img, repair = decode_image(_encode(transparent, "PNG"), 8)
    assert repair == "repaired_alpha" and (img == 255).all()  # transparent -> white page
    opaque = Image.new("RGBA", (8, 8), (10, 20, 30, 255))
    img, _ = decode_image(_encode(opaque, "PNG"), 8)
    assert img[:, 0, 0].tolist() == [10, 20, 30]
    img, repair = decode_image(_encode(Image.fromarray(np.full((8, 8), 65535, np.uint16)), "PNG"), 8)
    assert repair == "repaired_16bit" and (img == 255).all()
    img, repair = decode_image(_encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG"), 8)
    assert repair is None and img.dtype == torch.uint8 and img[:, 4, 4].tolist() == [1, 2, 3]
    with pytest.raises(SampleError) as info:
        decode_image(b"\x89PNG\r\n\x1a\n broken", 8)
    assert info.value.reason == "decode_error"


def test_resize_short_side_then_crop() -> None:
    # 60 x 20 image: left third red, middle green, right blue -> short side 20 -> 20x20 crop of the middle
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, :20, 0] = 255
    arr[:, 20:40, 1] = 255
    arr[:, 40:, 2] = 255
    data = _encode(Image.fromarray(arr), "PNG")
    center, _ = decode_image(data, 10, crop="center")
    assert center.shape == (3, 10, 10) and (center[1] > 200).all() and (center[0] < 50).all()
    crops = [decode_image(data, 10, crop="random", rng=random.Random(s))[0] for s in range(20)]
    first_cols = {c[:, 5, 0].argmax().item() for c in crops}
    last_cols = {c[:, 5, 9].argmax().item() for c in crops}
    assert 0 in first_cols and 2 in last_cols  # random crops reach both ends of the long side (red ... blue)
    tiny, _ = decode_image(_encode(Image.new("RGB", (4, 6), (9, 9, 9)), "PNG"), 12)  # upscale small images
    assert tiny.shape == (3, 12, 12)


def test_captions() -> None:
    assert decode_caption(b"\xef\xbb\xbf  a red circle \n", required=True) == "a red circle"
    assert decode_caption(None, required=False) == "" and decode_caption(b" ", required=False) == ""
    for data, reason in ((None, "missing_caption"), (b"\t", "empty_caption"), (b"\xff\xfe", "non_utf8_caption")):
        with pytest.raises(SampleError) as info:
            decode_caption(data, required=True)
        assert info.value.reason == reason


def test_prepare_data_generates_default_shapes(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    dm = TextImageDataModule(root=str(root), image_size=16, batch_size=2, batches_per_epoch=1,
                             shapes_kwargs=dict(num_images=24, num_videos=1, num_val_images=8, num_val_videos=1,
                                                image_size=16, video_size=16))
    batch = _batches(dm, "train")[0]
    assert (root / "DONE").is_file() and batch["image"].shape == (2, 3, 16, 16)
    assert dm.hparams["image_size"] == 16 and dm.hparams["batch_size"] == 2  # plain hyper-parameters saved
    own = TextImageDataModule(urls=str(root / "images" / "train-{000000..000001}.tar"), root=str(tmp_path / "no"))
    own.prepare_data()
    own.setup("fit")
    assert not (tmp_path / "no").exists() and own.val_dataloader() == []  # own data, no val_urls: no validation
