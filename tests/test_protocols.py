"""The UCF-101 and MSR-VTT protocols (lightning_mav/evaluation/protocols.py) on stand-ins written here: a classInd.txt
of Moving Shapes class names, a tiny UCF-101 folder of xvid .avi files of a known moving square, MSR-VTT json files."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.decode import ClipPlan, decode_planned_clip
from datamodules.skips import SkipCounter
from lightning_mav.evaluation.protocols import (PAPER_RESULTS, msrvtt_captions, ucf101_clip_start, ucf101_prompts,
                                                ucf101_real_clips, ucf101_sampling_description, ucf101_videos)
from tests.helpers import CLASSES, VIDEOS, H, synthetic_frames, write_avi

F = 8  # frames per real clip in these tests (16 in the protocol; 8 keeps the videos short)


def as_uint8(clip: torch.Tensor) -> np.ndarray:
    """``[3, F, S, S]`` in [-1, 1] -> uint8-scale float ``[F, S, S, 3]``."""
    return (clip.permute(1, 2, 3, 0).numpy() + 1) * 127.5


def collect(batches) -> dict[str, torch.Tensor]:
    """key -> clip ``[3, F, S, S]`` over all batches, failing on a repeated key."""
    clips: dict[str, torch.Tensor] = {}
    for x, keys in batches:
        assert x.shape[0] == len(keys)
        for clip, key in zip(x, keys):
            assert key not in clips, f"{key} twice"
            clips[key] = clip
    return clips


def one_line(error: pytest.ExceptionInfo[BaseException], *parts: str) -> None:
    message = str(error.value)
    assert "\n" not in message and all(p in message for p in parts), message


# ------------------------------------------------------------------------------------------------ real clips
@pytest.mark.parametrize("offset", ["random", "center", "first"])
def test_real_clips_are_the_frames_the_rule_names(ucf101, offset) -> None:
    root, frames = ucf101
    batches = list(ucf101_real_clips(root, num_frames=F, size=H, limit=None, batch_size=4, offset=offset))
    assert [x.shape for x, _ in batches] == [(4, 3, F, H, H), (2, 3, F, H, H)]
    assert all(x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1 for x, _ in batches)
    clips = collect(batches)
    assert list(clips) == sorted(name for _, name, _ in VIDEOS)  # file order: class folder, then file name
    starts = {}
    for key, clip in clips.items():
        native = frames[key][:, :, 8:56].astype(np.float64)  # the centre crop of the frames written
        starts[key] = start = ucf101_clip_start(key, len(native), F, offset=offset)
        # the decoded clip is the planned window within codec error, and closer to it than to any other window
        errors = [np.abs(as_uint8(clip) - native[s:s + F]).mean() for s in range(len(native) - F + 1)]
        assert errors[start] < 3.0, (key, errors[start])
        assert int(np.argmin(errors)) == start
    expected = {"first": {k: 0 for k in starts}, "center": {name: (num - F) // 2 for _, name, num in VIDEOS}}
    if offset in expected:
        assert starts == expected[offset]
    else:  # random: inside the video, not all equal, not all at the start
        lengths = {name: num for _, name, num in VIDEOS}
        assert all(0 <= start <= lengths[key] - F for key, start in starts.items())
        assert len(set(starts.values())) > 1 and max(starts.values()) > 0


def test_clip_start_depends_on_seed_and_key_only() -> None:
    assert ucf101_clip_start("v_RedCircle_g01_c01", 30, 8, offset="center") == 11
    assert ucf101_clip_start("v_RedCircle_g01_c01", 8, 8) == 0  # a clip as long as the video: one choice
    draws = [ucf101_clip_start("v_RedCircle_g01_c01", 200, 16, seed=0) for _ in range(3)]
    assert len(set(draws)) == 1
    assert {ucf101_clip_start(f"v_X_g01_c{i:02d}", 200, 16) for i in range(20)} != {draws[0]}
    assert {ucf101_clip_start("v_RedCircle_g01_c01", 200, 16, seed=s) for s in range(20)} != {draws[0]}
    with pytest.raises(Exception) as error:
        ucf101_clip_start("v_RedCircle_g01_c01", 7, 8)
    assert getattr(error.value, "reason", None) == "too_short_video"


def test_real_clips_deterministic_across_calls_batches_and_ranks(ucf101) -> None:
    root, _ = ucf101
    single = collect(ucf101_real_clips(root, num_frames=F, size=H, limit=None, batch_size=4))
    again = collect(ucf101_real_clips(root, num_frames=F, size=H, limit=None, batch_size=3))
    assert list(again) == list(single) and all(torch.equal(again[k], single[k]) for k in single)
    shares = [collect(ucf101_real_clips(root, num_frames=F, size=H, limit=None, batch_size=2, rank=r, world_size=2))
              for r in range(2)]
    keys = [k for share in shares for k in share]
    assert sorted(keys) == sorted(single) and len(keys) == len(set(keys))  # each key once, on one rank
    assert all(len(share) == 3 for share in shares)
    assert all(torch.equal(share[k], single[k]) for share in shares for k in share)  # the same clip on any rank


def test_real_clips_limit_is_a_seeded_subset_in_file_order(ucf101) -> None:
    root, _ = ucf101
    first = collect(ucf101_real_clips(root, num_frames=F, size=H, limit=3, batch_size=8))
    assert len(first) == 3 and list(first) == sorted(first)
    assert list(collect(ucf101_real_clips(root, num_frames=F, size=H, limit=3, batch_size=8))) == list(first)
    subsets = {tuple(collect(ucf101_real_clips(root, num_frames=F, size=H, limit=3, seed=s))) for s in range(6)}
    assert len(subsets) > 1  # the seed picks which videos
    shares = [collect(ucf101_real_clips(root, num_frames=F, size=H, limit=3, rank=r, world_size=2)) for r in range(2)]
    assert sorted(k for share in shares for k in share) == sorted(first)


def test_real_clips_resize_short_side_and_centre_crop(ucf101) -> None:
    root, frames = ucf101
    clips = collect(ucf101_real_clips(root, num_frames=F, size=24, limit=None, offset="first"))
    assert all(c.shape == (3, F, 24, 24) for c in clips.values())
    for key, clip in clips.items():
        # 64x48 -> 32x24, centre 24 columns: the same region as the full-size centre crop; area averaging keeps
        # each frame's mean colour
        region = frames[key][:F, :, 8:56].astype(np.float64)
        assert np.abs(as_uint8(clip).mean(axis=(1, 2)) - region.mean(axis=(1, 2))).max() < 3.0


def test_real_clips_split_list_order_and_skips(ucf101, tmp_path) -> None:
    root, _ = ucf101
    write_avi(root.parent / "broken" / "short" / "v_Short_g01_c01.avi", synthetic_frames(5, 0))
    (root.parent / "broken" / "bad").mkdir(parents=True, exist_ok=True)
    (root.parent / "broken" / "bad" / "v_Bad_g01_c01.avi").write_bytes(b"RIFF not really an avi")
    broken = root.parent / "broken"
    split = tmp_path / "trainlist01.txt"
    split.write_text("GreenTriangle/v_GreenTriangle_g01_c01.avi 3\nRedCircle/v_RedCircle_g01_c02.avi 1\n"
                     "RedCircle/v_RedCircle_g09_c09.avi 1\n")  # the last one is not on disk
    skips = SkipCounter()
    clips = collect(ucf101_real_clips(root, num_frames=F, size=H, limit=None, split_list=split, skips=skips))
    assert list(clips) == ["v_GreenTriangle_g01_c01", "v_RedCircle_g01_c02"]  # the list's order
    assert skips.snapshot()["counts"] == {"missing_video": 1}
    skips = SkipCounter()
    clips = collect(ucf101_real_clips(broken, num_frames=F, size=H, limit=None, skips=skips))
    assert clips == {}
    assert skips.snapshot()["counts"] == {"corrupt_video": 1, "too_short_video": 1}


def test_decode_planned_clip_reads_bytes_and_paths_alike(ucf101) -> None:
    root, frames = ucf101
    path = root / "BlueSquare" / "v_BlueSquare_g02_c01.avi"
    seen = []

    def plan(num_native: int, native_fps: float) -> ClipPlan:
        seen.append((num_native, native_fps))
        return ClipPlan(start=13, stride=2, num_frames=5, fps=native_fps / 2)
    from_path = decode_planned_clip(path, plan, size=H)
    from_bytes = decode_planned_clip(path.read_bytes(), plan, size=H)
    assert seen == [(29, 25.0), (29, 25.0)]
    assert torch.equal(from_path.frames, from_bytes.frames) and from_path.indices == [13, 15, 17, 19, 21]
    decoded = from_path.frames.permute(0, 2, 3, 1).numpy().astype(np.float64)
    assert np.abs(decoded - frames["v_BlueSquare_g02_c01"][13:22:2, :, 8:56]).mean() < 3.0


def test_real_clips_folder_errors(ucf101, tmp_path) -> None:
    root, _ = ucf101
    with pytest.raises(FileNotFoundError) as error:
        ucf101_real_clips(tmp_path / "nowhere", size=H, limit=None)
    one_line(error, "nowhere", "<ClassName>/v_<ClassName>_gXX_cYY.avi")
    (tmp_path / "empty" / "RedCircle").mkdir(parents=True)
    with pytest.raises(ValueError) as error:
        ucf101_real_clips(tmp_path / "empty", size=H, limit=None)
    one_line(error, "empty", "no .avi files")
    elsewhere = tmp_path / "testlist01.txt"
    elsewhere.write_text("RedCircle/v_RedCircle_g07_c01.avi\n")
    with pytest.raises(FileNotFoundError) as error:
        ucf101_real_clips(root, size=H, limit=None, split_list=elsewhere)
    one_line(error, str(root), "testlist01.txt")
    with pytest.raises(ValueError) as error:
        ucf101_real_clips(root, size=H, limit=None, rank=2, world_size=2)
    one_line(error, "rank 2")
    (tmp_path / "dup" / "A").mkdir(parents=True)
    (tmp_path / "dup" / "B").mkdir(parents=True)
    for d in "AB":
        (tmp_path / "dup" / d / "v_Same_g01_c01.avi").write_bytes(b"x")
    with pytest.raises(ValueError) as error:
        ucf101_videos(tmp_path / "dup")
    one_line(error, "v_Same_g01_c01", "unique")
    twice = tmp_path / "trainlist02.txt"
    twice.write_text("RedCircle/v_RedCircle_g01_c01.avi 1\nRedCircle/v_RedCircle_g01_c01.avi 1\n")
    with pytest.raises(ValueError) as error:
        ucf101_videos(root, twice)
    one_line(error, "v_RedCircle_g01_c01", "twice")


def test_sampling_description_names_every_choice(tmp_path) -> None:
    split = tmp_path / "trainlist01.txt"
    split.write_text("RedCircle/v_RedCircle_g01_c01.avi 1\n")
    base = ucf101_sampling_description(size=128, limit=2048, split_list=split)
    assert base == ucf101_sampling_description(size=128, limit=2048, split_list=split)
    assert all(s in base for s in ("16 consecutive", "128", "2048", "trainlist01.txt", "seed 0", "random"))
    others = [ucf101_sampling_description(size=64, limit=2048, split_list=split),
              ucf101_sampling_description(size=128, limit=None, split_list=split),
              ucf101_sampling_description(size=128, limit=2048, split_list=split, seed=1),
              ucf101_sampling_description(size=128, limit=2048, split_list=split, offset="center"),
              ucf101_sampling_description(num_frames=8, size=128, limit=2048, split_list=split),
              ucf101_sampling_description(size=128, limit=2048)]
    split.write_text("RedCircle/v_RedCircle_g01_c02.avi 1\n")  # same name, other content
    others.append(ucf101_sampling_description(size=128, limit=2048, split_list=split))
    assert len({base, *others}) == len(others) + 1


# --------------------------------------------------------------------------------------------------- prompts
@pytest.fixture
def class_ind(tmp_path) -> Path:
    path = tmp_path / "classInd.txt"
    path.write_text("".join(f"{i} {name}\n" for i, name in enumerate(CLASSES, 1)))
    return path


def test_prompts_uniform_over_classes_interleaved(class_ind) -> None:
    prompts = ucf101_prompts(class_ind, 10)
    assert [c for _, c in prompts] == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]  # counts 4, 3, 3: the extra one to class 0
    assert {p: c for p, c in prompts} == {"red circle": 0, "blue square": 1, "green triangle": 2}
    assert ucf101_prompts(class_ind, 3, "a video of a {class}") == [
        ("a video of a red circle", 0), ("a video of a blue square", 1), ("a video of a green triangle", 2)]
    assert Counter(c for _, c in ucf101_prompts(class_ind)) == {0: 3334, 1: 3333, 2: 3333}


def test_prompts_follow_the_split_lists_class_frequencies(class_ind, tmp_path) -> None:
    trainlist = tmp_path / "trainlist01.txt"
    lines = [("RedCircle", 1)] * 6 + [("BlueSquare", 2)] * 3 + [("GreenTriangle", 3)]
    trainlist.write_text("".join(f"{c}/v_{c}_g{i:02d}_c01.avi {n}\n" for i, (c, n) in enumerate(lines)))
    assert Counter(c for _, c in ucf101_prompts(class_ind, 20, trainlist=trainlist)) == {0: 12, 1: 6, 2: 2}
    # 7 videos: quotas 4.2, 2.1, 0.7 -> floors 4, 2, 0, the one left to the largest remainder (class 2)
    seven = ucf101_prompts(class_ind, 7, trainlist=trainlist)
    assert Counter(c for _, c in seven) == {0: 4, 1: 2, 2: 1}
    assert [c for _, c in seven[:3]] == [0, 1, 0]  # a prefix keeps the proportions (class 2's one is mid-list)
    testlist = tmp_path / "testlist01.txt"  # no class numbers: folders matched by name, case-insensitively
    testlist.write_text("Redcircle/v_RedCircle_g01_c01.avi\nBlueSquare/v_BlueSquare_g01_c01.avi\n")
    assert Counter(c for _, c in ucf101_prompts(class_ind, 4, trainlist=testlist)) == {0: 2, 1: 2}


def test_prompt_errors(class_ind, tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        ucf101_prompts(tmp_path / "missing.txt")
    one_line(error, "missing.txt", "classInd.txt")
    with pytest.raises(ValueError) as error:
        ucf101_prompts(class_ind, template="a video")
    one_line(error, "{class}")
    bad = tmp_path / "testlist01.txt"
    bad.write_text("RedCircle/v_RedCircle_g01_c01.avi\nPurpleStar/v_PurpleStar_g01_c01.avi\n")
    with pytest.raises(ValueError) as error:
        ucf101_prompts(class_ind, trainlist=bad)
    one_line(error, "testlist01.txt:2", "PurpleStar")
    bad.write_text("RedCircle/v_RedCircle_g01_c01.avi 4\n")
    with pytest.raises(ValueError) as error:
        ucf101_prompts(class_ind, trainlist=bad)
    one_line(error, "testlist01.txt:1", "1..3")


# --------------------------------------------------------------------------------------------------- MSR-VTT
MSRVTT = {
    "info": {"year": 2016},
    "videos": [{"video_id": "video0", "split": "train", "id": 0}, {"video_id": "video1", "split": "test", "id": 1},
               {"video_id": "video2", "split": "validate", "id": 2}, {"video_id": "video3", "split": "test", "id": 3}],
    "sentences": [{"video_id": "video3", "caption": "a man cooks pasta", "sen_id": 0},
                  {"video_id": "video0", "caption": "a dog runs", "sen_id": 1},
                  {"video_id": "video1", "caption": " a car drives at night ", "sen_id": 2},
                  {"video_id": "video2", "caption": "a girl sings", "sen_id": 3},
                  {"video_id": "video3", "caption": "someone is cooking", "sen_id": 4},
                  {"video_id": "video1", "caption": "a car drives at night", "sen_id": 5}],
}


def test_msrvtt_captions_of_the_split_in_file_order(tmp_path) -> None:
    path = tmp_path / "MSRVTT_data.json"
    path.write_text(json.dumps(MSRVTT))
    test = ["a man cooks pasta", "a car drives at night", "someone is cooking", "a car drives at night"]
    assert msrvtt_captions(path) == test  # every caption, duplicates kept, stripped
    assert msrvtt_captions(path, limit=2) == test[:2]
    assert msrvtt_captions(path, limit=100) == test
    assert msrvtt_captions(path, split="validate") == ["a girl sings"]
    assert msrvtt_captions(path, split="train") == ["a dog runs"]


def test_msrvtt_txt_and_jsonl(tmp_path) -> None:
    txt = tmp_path / "captions.txt"
    txt.write_text("a dog runs\n\n# a comment\n a cat sleeps \n")
    assert msrvtt_captions(txt) == ["a dog runs", "a cat sleeps"]
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text('{"caption": "a dog runs"}\n{"prompt": "a cat sleeps"}\n\n{"text": "a bird sings"}\n')
    assert msrvtt_captions(jsonl, limit=2) == ["a dog runs", "a cat sleeps"]
    jsonl.write_text('{"caption": "a dog runs"}\n{"title": "no caption here"}\n')
    with pytest.raises(ValueError) as error:
        msrvtt_captions(jsonl)
    one_line(error, "captions.jsonl:2", "'caption'")


@pytest.mark.parametrize("content, expected", [
    ({"videos": MSRVTT["videos"]}, "missing key 'sentences'"),
    ({"sentences": MSRVTT["sentences"]}, "missing key 'videos'"),
    ([1, 2], "top level is a list"),
    ({"videos": [{"video_id": "video1"}], "sentences": []}, "videos[0] has no 'split'"),
    ({"videos": MSRVTT["videos"], "sentences": [{"video_id": "video1", "text": "x"}]}, "sentences[0] has no 'caption'"),
    ({"videos": [{"video_id": "video0", "split": "train"}], "sentences": []}, "no videos with split 'test' (splits in "
                                                                               "the file: train)"),
])
def test_msrvtt_json_of_the_wrong_shape(tmp_path, content, expected) -> None:
    path = tmp_path / "test_videodatainfo.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError) as error:
        msrvtt_captions(path)
    one_line(error, "test_videodatainfo.json", expected)


def test_msrvtt_file_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        msrvtt_captions(tmp_path / "nothing.json")
    one_line(error, "nothing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"videos": [')
    with pytest.raises(ValueError) as error:
        msrvtt_captions(broken)
    one_line(error, "broken.json", "not valid JSON")
    other = tmp_path / "captions.csv"
    other.write_text("a,b\n")
    with pytest.raises(ValueError) as error:
        msrvtt_captions(other)
    one_line(error, "captions.csv", ".json, .jsonl or .txt")


def test_paper_results() -> None:
    assert {k: r.value for k, r in PAPER_RESULTS.items()} == {
        "ucf101/zero-shot/fvd": 367.23, "ucf101/zero-shot/is": 33.00, "ucf101/fine-tuned/fvd": 81.25,
        "ucf101/fine-tuned/is": 82.55, "msrvtt/zero-shot/clipsim": 0.3049}
    assert PAPER_RESULTS["msrvtt/zero-shot/clipsim"].model == "CLIP ViT-B/32"
    assert PAPER_RESULTS["msrvtt/zero-shot/clipsim"].num_samples == 59_794
    assert not PAPER_RESULTS["ucf101/zero-shot/fvd"].higher_is_better
    assert PAPER_RESULTS["ucf101/zero-shot/is"].higher_is_better
