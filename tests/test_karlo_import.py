"""``mav import karlo``: a tiny random-init Karlo written by diffusers' ``save_pretrained`` becomes P, D and SR_l runs
that compute what diffusers computes, D_t / ↑F / SR_t train from them and ``mav generate`` writes a video; bad
folders fail in one line before anything is written."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from lightning_mav.commands import main
from lightning_mav.networks import BY_KEY, default_checkpoint
from lightning_mav.pipeline import load_stage
from lightning_mav.stages.decoder import DecoderStage
from lightning_mav.stages.prior import PriorStage
from lightning_mav.stages.superres import SuperResStage
from tests.helpers import EXPERIMENTS, save_open_clip_weights, write_tiny_karlo

RUNS = {"P": "prior", "D": "decoder", "SR_l": "sr_l"}


@pytest.fixture(scope="module")
def karlo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Karlo, an open_clip weights file of the CLIP it reads (mav-tiny) and the runs imported from them."""
    root = tmp_path_factory.mktemp("karlo")
    src = write_tiny_karlo(root / "karlo-v1-alpha")
    clip = save_open_clip_weights(root / "open_clip_pytorch_model.bin")
    main(["import", "karlo", str(src), "--runs", str(root / "runs"), "--clip", str(clip), "--clip-model", "mav-tiny"])
    return {"src": src, "clip": clip, "runs": root / "runs"}


def rel_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def text_inputs(batch: int, length: int = 32, width: int = 128) -> dict[str, torch.Tensor]:
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[:, 7:] = False  # padding after the first tokens, as a short caption
    return {"text_embed": torch.randn(batch, width), "text_hidden": torch.randn(batch, length, width),
            "text_mask": mask}


# ------------------------------------------------------------------------------------------------ the runs
def test_import_writes_runs_like_trained_ones(karlo: dict[str, Path]) -> None:
    for key, run in RUNS.items():
        ckpt = default_checkpoint(karlo["runs"], key)
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert saved["hyper_parameters"]["sampler"] == "unclip"
        config = yaml.safe_load((karlo["runs"] / run / "config.yaml").read_text())
        assert config["model"]["class_path"] == BY_KEY[key].module
        assert config["model"]["init_args"] == saved["hyper_parameters"]
        done = json.loads((karlo["runs"] / run / "DONE").read_text())
        assert done["stage"] == run and done["imported_from"] == str(karlo["src"])
    assert not [p for p in karlo["runs"].iterdir() if p.name.startswith(".")]  # no temporary folder left


@torch.no_grad()
def test_imported_networks_compute_what_diffusers_computes(karlo: dict[str, Path]) -> None:
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    torch.manual_seed(0)
    src, runs = karlo["src"], karlo["runs"]
    b, t = 2, torch.tensor([3, 700])
    cond = text_inputs(b)

    P = load_stage(PriorStage, default_checkpoint(runs, "P"), stage="P")
    prior = PriorTransformer.from_pretrained(src / "prior", low_cpu_mem_usage=False).eval()
    y_t = torch.randn(b, 128)
    ours = P.prior(y_t, t, **cond)
    reference = prior(y_t, t, proj_embedding=cond["text_embed"], encoder_hidden_states=cond["text_hidden"],
                      attention_mask=cond["text_mask"]).predicted_image_embedding
    assert rel_error(ours, reference) <= 1e-4
    assert torch.allclose(P.from_diffusion(y_t), prior.post_process_latents(y_t), atol=1e-6)

    D = load_stage(DecoderStage, default_checkpoint(runs, "D"), stage="D", image_embed_dim=128)
    decoder = UNet2DConditionModel.from_pretrained(src / "decoder", low_cpu_mem_usage=False).eval()
    text_proj = UnCLIPTextProjModel.from_pretrained(src / "text_proj", low_cpu_mem_usage=False).eval()
    x, image_embed = torch.randn(b, 3, 16, 16), torch.randn(b, 128)
    for drop in (False, True):  # conditional, and the unconditional branch of Karlo's guidance (learned null y_e)
        n = 1 + drop  # with guidance text_proj prepends the null image embedding to a doubled batch
        hidden, additive = text_proj(image_embeddings=image_embed, prompt_embeds=torch.cat([cond["text_embed"]] * n),
                                     text_encoder_hidden_states=torch.cat([cond["text_hidden"]] * n),
                                     do_classifier_free_guidance=drop)
        mask = torch.cat([F.pad(cond["text_mask"], (4, 0), value=True)] * n)
        reference = decoder(torch.cat([x] * n), torch.cat([t] * n), encoder_hidden_states=hidden,
                            class_labels=additive, attention_mask=mask).sample[:b]
        ours = D.unet(x, t, image_embed=image_embed, drop_cond=torch.full((b,), drop), **cond)
        assert ours.shape == (b, 6, 16, 16) and rel_error(ours, reference) <= 1e-4, drop

    SR = load_stage(SuperResStage, default_checkpoint(runs, "SR_l"), stage="SR_l")
    assert (SR.lowres_size, SR.highres_size) == (16, 64)
    x, lowres = torch.randn(b, 3, 64, 64), torch.rand(b, 3, 16, 16) * 2 - 1
    upscaled = F.interpolate(lowres, size=(64, 64), mode="bicubic", align_corners=False, antialias=True)
    for ours_net, part in ((SR.unet, "super_res_first"), (SR.unet_last, "super_res_last")):
        network = UNet2DModel.from_pretrained(src / part, low_cpu_mem_usage=False).eval()
        reference = network(torch.cat([x, upscaled], 1), t).sample
        assert rel_error(ours_net(x, t, lowres=lowres), reference) <= 1e-4, part


@torch.no_grad()
def test_dt_from_the_imported_decoder_is_d_on_every_frame(karlo: dict[str, Path]) -> None:
    """D_t at init == the imported D per frame, both reading the empty caption (video has none)."""
    torch.manual_seed(0)
    parent = default_checkpoint(karlo["runs"], "D")
    D_t = DecoderStage(init_from=str(parent), unet={"temporal": True, "fps_cond": True}).eval()
    assert D_t.hparams.clip_ckpt == str(karlo["clip"]) and D_t.embed_space == "raw"  # inherited from the import
    assert D_t.init_report is not None and not D_t.init_report.missing and D_t.init_report.new
    empty = D_t.clip.encode_text_hidden(D_t.clip.tokenize([""]), normalize=False)
    inputs = D_t.text_inputs(2)
    for got, want in zip((inputs["text_embed"], inputs["text_hidden"], inputs["text_mask"]), empty):
        assert torch.equal(got, want.expand_as(got))

    D = load_stage(DecoderStage, parent, stage="D", image_embed_dim=128)
    D.clip = D_t.clip
    video, t, image_embed = torch.randn(2, 3, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 128)
    fps = torch.tensor([4.0, 24.0])
    ours = D_t.model_fn(image_embed, fps=fps)(video, t)
    frames = [D.model_fn(image_embed)(video[:, :, f], t) for f in range(4)]
    assert torch.allclose(ours, torch.stack(frames, 2), atol=1e-5)


@torch.no_grad()
def test_sr_t_and_up_f_start_as_their_imported_parents(karlo: dict[str, Path]) -> None:
    """SR_t from the imported SR_l is SR_l on every frame; ↑F from a D_t of the imported D is that D_t (its extra
    input convolution starts at zero)."""
    from lightning_mav.stages.interpolation import InterpolationStage

    torch.manual_seed(0)
    sr_l_ckpt = default_checkpoint(karlo["runs"], "SR_l")
    SR_t = SuperResStage(init_from=str(sr_l_ckpt), unet={"temporal": True}).eval()
    assert SR_t.init_report.ok and SR_t.unet_last is None and not SR_t.noise_aug
    SR_l = load_stage(SuperResStage, sr_l_ckpt, stage="SR_l")
    video, lowres, t = torch.randn(1, 3, 3, 64, 64), torch.rand(1, 3, 3, 16, 16) * 2 - 1, torch.tensor([40])
    level = torch.zeros(1)
    ours = SR_t.model_fn(lowres, level)(video, t)
    frames = [SR_l.model_fn(lowres[:, :, f], level)(video[:, :, f], t) for f in range(3)]
    assert torch.allclose(ours, torch.stack(frames, 2), atol=1e-5)

    D_t = DecoderStage(init_from=str(default_checkpoint(karlo["runs"], "D")), unet={"temporal": True, "fps_cond": True})
    D_t.unet.requires_grad_(False)
    for name, p in D_t.unet.named_parameters():  # train-like temporal weights, so ↑F == D_t is not D per frame
        if "temporal" in name:
            p.normal_(std=0.02)
    parent = karlo["runs"] / "dt_at_init.ckpt"
    torch.save({"state_dict": D_t.state_dict(), "hyper_parameters": dict(D_t.hparams)}, parent)
    up_F = InterpolationStage(init_from=str(parent), num_frames=4).eval()
    assert up_F.init_report.ok and up_F.init_report.new == ["extra_in.weight"]
    video, known = torch.randn(1, 3, 4, 16, 16), torch.tensor([[True, False, False, True]])
    image_embed, fps = torch.randn(1, 128), torch.tensor([8.0])
    ours = up_F.model_fn(image_embed, fps=fps, frames=video, known=known)(video, t)
    assert torch.allclose(ours, D_t.eval().model_fn(image_embed, fps=fps)(video, t), atol=1e-5)


def test_the_video_stages_train_on_the_import_and_generate(karlo: dict[str, Path], shapes_root: Path,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """D_t, ↑F and SR_t under the Karlo overlays from the imported runs, then ``mav generate``."""
    import shutil

    from lightning_mav.trainer_cli import MAVCLI

    runs = tmp_path / "runs"
    shutil.copytree(karlo["runs"], runs)
    monkeypatch.chdir(tmp_path)
    common = ["--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false", "--trainer.limit_val_batches", "1",
              "--data.init_args.root", str(shapes_root),
              "--data.init_args.urls", str(shapes_root / "videos" / "train-*.tar"),
              "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "1",
              "--data.init_args.shuffle_buffer", "4", "--data.init_args.num_frames", "4",
              "--data.init_args.fps_min", "4", "--data.init_args.fps_max", "24"]

    def fit(stage: str, *extra: str) -> Any:
        args = ["fit", "--config", str(EXPERIMENTS / f"{stage}.yaml"), "--config", str(EXPERIMENTS / "karlo" /
                f"{stage}.yaml"), *common, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                "--model.init_args.sample_steps", "2", "--model.init_args.media_batch_size", "1", *extra]
        return MAVCLI(args=args)

    dt = fit("dt", "--data.init_args.video_size", "16", "--model.init_args.image_size", "16")
    assert dt.trainer.global_step == 2 and dt.model.init_report.ok
    assert dt.model.diffusion.learned_variance and dt.model.sampler == "unclip"
    interp = fit("interp", "--data.init_args.video_size", "16", "--model.init_args.image_size", "16",
                 "--model.init_args.num_frames", "4")
    assert interp.trainer.global_step == 2 and interp.model.init_report.ok
    sr_t = fit("sr_t", "--data.init_args.video_size", "64", "--model.init_args.lowres_size", "16",
               "--model.init_args.highres_size", "64")
    assert sr_t.trainer.global_step == 2 and sr_t.model.init_report.ok and sr_t.model.unet_last is None

    out = tmp_path / "x.mp4"
    main(["generate", "a red circle moving", "--out", str(out), "--runs", str(runs), "--sr-h", "none",
          "--num-frames", "3", "--skip", "2", "--steps", "2", "--dtype", "fp32", "--no-gif", "--no-progress",
          "--device", "cpu"])
    import av

    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape[:2] == (64, 64)  # 3 frames -> 5 by ↑F, 16 px -> 64 px by SR_t

    main(["evaluate", "--runs", str(runs), "--data", str(shapes_root), "--out", str(tmp_path / "eval"),
          "--num-prompts", "2", "--num-frames", "3", "--skip", "2", "--steps", "2", "--eval-clips", "2", "--quick",
          "--stats-cache", "none", "--dtype", "fp32", "--device", "cpu", "--no-progress"])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics  # the imported chain scores like a trained one


# ------------------------------------------------------------------------------------------------ bad input
def import_error(capsys: pytest.CaptureFixture[str], src: Path, runs: Path, *extra: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["import", "karlo", str(src), "--runs", str(runs), *extra])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not runs.exists() or not any(runs.iterdir()), "nothing may be written before the input is checked"
    return err


@pytest.fixture
def fresh_karlo(tmp_path: Path) -> Path:
    return write_tiny_karlo(tmp_path / "karlo")


def test_a_missing_folder_fails_naming_it(fresh_karlo: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    shutil.rmtree(fresh_karlo / "super_res_last")
    err = import_error(capsys, fresh_karlo, tmp_path / "runs")
    assert str(fresh_karlo / "super_res_last") in err and "missing folder" in err
    assert str(tmp_path / "nowhere") in import_error(capsys, tmp_path / "nowhere", tmp_path / "runs")


def test_another_architecture_fails_naming_its_config(fresh_karlo: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A Stable Diffusion U-Net (cross-attention blocks) where Karlo's decoder belongs."""
    config_path = fresh_karlo / "decoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["down_block_types"] = ["CrossAttnDownBlock2D", "DownBlock2D"]
    config_path.write_text(json.dumps(config))
    err = import_error(capsys, fresh_karlo, tmp_path / "runs")
    assert str(config_path) in err and "CrossAttnDownBlock2D" in err


def test_a_shape_mismatch_fails_naming_the_tensor(fresh_karlo: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file, save_file

    weights = fresh_karlo / "super_res_first" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["conv_in.weight"] = torch.zeros(16, 5, 3, 3)
    save_file(state, str(weights))
    err = import_error(capsys, fresh_karlo, tmp_path / "runs")
    assert "super_res_first" in err and "conv_in.weight" in err


def test_a_clip_of_the_wrong_width_fails_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_tiny_karlo(tmp_path / "karlo", embed_dim=64)
    clip = save_open_clip_weights(tmp_path / "open_clip_pytorch_model.bin")  # mav-tiny: 128-d
    err = import_error(capsys, src, tmp_path / "runs", "--clip", str(clip), "--clip-model", "mav-tiny")
    assert str(clip) in err and "64" in err and "128" in err


def test_existing_runs_are_kept_unless_forced(karlo: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    (runs / "decoder").mkdir(parents=True)
    (runs / "decoder" / "mine.txt").write_text("a run of mine")
    with pytest.raises(SystemExit):
        main(["import", "karlo", str(karlo["src"]), "--runs", str(runs)])
    assert "--force" in capsys.readouterr().err and (runs / "decoder" / "mine.txt").is_file()
    assert not (runs / "prior").exists()
    main(["import", "karlo", str(karlo["src"]), "--runs", str(runs), "--force"])
    assert not (runs / "decoder" / "mine.txt").exists() and default_checkpoint(runs, "D").is_file()
