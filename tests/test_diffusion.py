"""Diffusion: targets and their inversions, the loss, samplers (any rank), classifier-free guidance, SR noise aug."""
from __future__ import annotations

import pytest
import torch

from lightning_mav.diffusion import Diffusion, repeat_to_batch

SHAPES = {"2d": (4, 8), "4d": (2, 3, 4, 4), "5d": (2, 3, 3, 4, 4)}  # prior embeddings, images, videos
OBJECTIVES = ("eps", "v", "x0")
SAMPLERS = ("ddim", "ddpm", "dpm++")


def oracle(diffusion: Diffusion, x0: torch.Tensor):
    """A 'network' that knows x0 and returns the objective's exact target for any x_t."""
    def model_fn(x_t: torch.Tensor, t: torch.Tensor, drop_cond=False) -> torch.Tensor:
        a = diffusion.alphas_cumprod.to(x_t)[t].reshape(-1, *([1] * (x_t.dim() - 1)))
        clean = repeat_to_batch(x0, x_t.shape[0]).to(x_t)
        noise = (x_t - a.sqrt() * clean) / (1 - a).sqrt()
        return diffusion.target(clean, noise, t)
    return model_fn


def toy_model(x_t: torch.Tensor, t: torch.Tensor, drop_cond=False) -> torch.Tensor:
    """Deterministic, t- and drop-dependent stand-in for a network (any rank)."""
    tt = (t.float() / 1000).reshape(-1, *([1] * (x_t.dim() - 1)))
    drop = torch.as_tensor(drop_cond, device=x_t.device).float().reshape(-1, *([1] * (x_t.dim() - 1)))
    return 0.5 * x_t * (1 - tt) + 0.1 * torch.sin(3 * x_t) + 0.3 * (1 - drop)


@pytest.mark.parametrize("rank", list(SHAPES))
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("schedule", ("cosine", "linear"))
def test_targets_invert_to_x0_and_noise(rank: str, objective: str, schedule: str) -> None:
    d = Diffusion(1000, schedule, objective)
    shape = SHAPES[rank]
    x0, noise = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    for t_value in (0, 1, 250, 500, 999):
        t = torch.full((shape[0],), t_value, dtype=torch.long)
        a = d.alphas_cumprod.double()[t_value]
        x_t = d.q_sample(x0, t, noise)
        torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise)
        target = d.target(x0, noise, t)
        expected = {"eps": noise, "v": a.sqrt() * noise - (1 - a).sqrt() * x0, "x0": x0}[objective]
        torch.testing.assert_close(target, expected)
        assert (d.predict_x0(x_t, t, target) - x0).abs().max() < 1e-5
        assert (d.predict_eps(x_t, t, target) - noise).abs().max() < 1e-5


def test_schedules_are_monotone_and_reach_noise() -> None:
    for schedule in ("cosine", "linear"):
        a = Diffusion(1000, schedule).alphas_cumprod
        assert a.shape == (1000,) and (a[1:] < a[:-1]).all()
        assert a[0] > 0.99 and a[-1] < 1e-3
    with pytest.raises(ValueError, match="objective"):
        Diffusion(objective="score")


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_loss_is_zero_for_the_oracle_and_weights_mask(objective: str) -> None:
    d = Diffusion(1000, "cosine", objective)
    x0 = torch.randn(2, 3, 2, 4, 4)
    g = torch.Generator().manual_seed(1)
    assert d.loss(lambda x_t, t: oracle(d, x0)(x_t, t), x0, generator=g) < 1e-8

    noise, t = torch.randn_like(x0), torch.tensor([10, 900])
    target = d.target(x0, noise, t)
    loss = d.loss(lambda x_t, t: torch.zeros_like(x_t), x0, noise=noise, t=t)
    torch.testing.assert_close(loss, target.pow(2).mean())
    # a frame mask weights only the selected frames; per-sample weights select samples
    mask = torch.zeros(2, 1, 2, 1, 1)
    mask[:, :, 1] = 1
    masked = d.loss(lambda x_t, t: torch.zeros_like(x_t), x0, noise=noise, t=t, weights=mask)
    torch.testing.assert_close(masked, target[:, :, 1].pow(2).mean())
    per_sample = d.loss(lambda x_t, t: torch.zeros_like(x_t), x0, noise=noise, t=t, weights=torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(per_sample, target[1].pow(2).mean())


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_min_snr_weighting_makes_every_objective_min_snr_times_the_x0_error(objective: str) -> None:
    """A network that is off by δ in x0 (and consistent with x_t): weighted loss = mean_t min(SNR_t, γ)·δ²."""
    gamma, delta = 5.0, 0.1
    d = Diffusion(1000, "cosine", objective, min_snr_gamma=gamma)
    x0 = torch.rand(4, 3, 4, 4) * 2 - 1
    t = torch.tensor([5, 200, 600, 990])  # SNR from ~1e4 (clipped to γ) down to ~1e-4
    wrong = oracle(d, x0 + delta)
    loss = d.loss(wrong, x0, t=t, noise=torch.randn_like(x0))
    a = d.alphas_cumprod[t]
    snr = a / (1 - a)
    torch.testing.assert_close(loss, (snr.clamp(max=gamma) * delta**2).mean(), rtol=1e-3, atol=1e-7)
    assert Diffusion(1000, "cosine", objective).loss(wrong, x0, t=t, noise=torch.randn_like(x0)) != loss
    with pytest.raises(ValueError, match="min_snr_gamma"):
        Diffusion(min_snr_gamma=0)


def test_loss_is_reproducible_under_a_generator() -> None:
    d = Diffusion(100, "linear", "v")
    x0 = torch.randn(4, 8)
    losses = [d.loss(lambda x_t, t: toy_model(x_t, t), x0, generator=torch.Generator().manual_seed(seed))
              for seed in (3, 3, 4)]
    assert losses[0] == losses[1] and losses[0] != losses[2]


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("rank", list(SHAPES))
def test_sampler_recovers_x0_from_an_oracle(sampler: str, objective: str, rank: str) -> None:
    d = Diffusion(1000, "cosine", objective)
    x0 = torch.randn(SHAPES[rank])
    out = d.sample(oracle(d, x0), x0.shape, steps=8, sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert out.shape == x0.shape
    assert (out - x0).abs().max() < 1e-4


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampling_is_deterministic_under_a_seed(sampler: str) -> None:
    d = Diffusion(1000, "cosine", "eps", clip_sample=1.0)
    shape = SHAPES["5d"]

    def run(seed: int, **kw) -> torch.Tensor:
        return d.sample(toy_model, shape, steps=6, sampler=sampler, guidance_scale=3.0,
                        generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # the initial noise can be given instead (SR_h's identical noise per frame); it is what the seed would draw
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if sampler != "ddpm":  # DDPM also draws step noise from the generator
        assert torch.equal(d.sample(toy_model, steps=6, sampler=sampler, guidance_scale=3.0, noise=noise), a)


def test_guidance_scale_one_is_the_conditional_branch_with_one_call_per_step() -> None:
    d = Diffusion(1000, "cosine", "v")
    calls: list[object] = []

    def counted(x_t, t, drop_cond):
        calls.append(drop_cond)
        return toy_model(x_t, t, drop_cond)

    def conditional_only(x_t, t, drop_cond):
        return toy_model(x_t, t, False)

    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    out = d.sample(counted, (2, 3, 4, 4), steps=5, guidance_scale=1.0, generator=g())
    assert calls == [False] * 5
    ref = d.sample(conditional_only, (2, 3, 4, 4), steps=5, guidance_scale=4.0, generator=g())
    assert torch.equal(out, ref)  # cond == uncond makes any scale exactly the conditional prediction


def test_cfg_batched_equals_sequential_and_combines_branches() -> None:
    d = Diffusion(1000, "cosine", "eps")
    x, t = torch.randn(2, 3, 4, 4), torch.tensor([500, 500])
    shapes: list[tuple[int, ...]] = []

    def model(x_t, t, drop_cond):
        shapes.append(tuple(x_t.shape))
        return toy_model(x_t, t, drop_cond)

    batched = d.guided(model, x, t, 3.0, cfg_batch=True)
    sequential = d.guided(model, x, t, 3.0, cfg_batch=False)
    assert shapes == [(4, 3, 4, 4), (2, 3, 4, 4), (2, 3, 4, 4)]
    torch.testing.assert_close(batched, sequential)
    cond, uncond = toy_model(x, t, False), toy_model(x, t, True)
    torch.testing.assert_close(batched, uncond + 3.0 * (cond - uncond))


def test_clip_sample_bounds_images() -> None:
    d = Diffusion(1000, "cosine", "x0", clip_sample=1.0)
    for sampler in SAMPLERS:
        out = d.sample(lambda x, t, drop: 3 * x, (2, 3, 4, 4), steps=4, sampler=sampler,
                       generator=torch.Generator().manual_seed(0))
        assert out.abs().max() <= 1.0 + 1e-6


def test_noise_lowres_levels() -> None:
    d = Diffusion(1000, "cosine")
    lowres = torch.rand(3, 3, 2, 4, 4) * 2 - 1
    same, level = d.noise_lowres(lowres, 0.0)
    assert torch.equal(same, lowres) and torch.equal(level, torch.zeros(3))  # level 0: untouched
    noise = torch.randn_like(lowres)
    noised, level = d.noise_lowres(lowres, torch.tensor([0.0, 0.2, 1.0]), noise=noise)
    torch.testing.assert_close(level, torch.tensor([0.0, 200.0, 999.0]))  # on the timestep scale
    torch.testing.assert_close(noised, d.q_sample(lowres, torch.tensor([0, 200, 999]), noise) * torch.tensor(
        [0.0, 1, 1]).view(3, 1, 1, 1, 1) + lowres * torch.tensor([1.0, 0, 0]).view(3, 1, 1, 1, 1))
    assert (noised[2] - noise[2]).abs().max() < 0.01  # the top level is (almost) pure noise


def test_frame_noise_share_correlates_video_frames_only() -> None:
    d = Diffusion(100, "cosine", "v", frame_noise_share=0.5)
    g = torch.Generator().manual_seed(0)
    video = d.noise((32, 3, 8, 16, 16), generator=g)
    per_pixel = video.permute(0, 1, 3, 4, 2).reshape(-1, 8)  # [pixels, F]
    corr = torch.corrcoef(per_pixel.T)
    off_diagonal = corr[~torch.eye(8, dtype=torch.bool)]
    assert (off_diagonal - 0.5).abs().max() < 0.03  # every pair of frames shares half the variance
    assert abs(video.std().item() - 1) < 0.01 and abs(video.mean().item()) < 0.01  # still N(0, I) per frame
    # images (and embeddings) are untouched; share 0 draws exactly what the plain sampler drew before
    plain = Diffusion(100, "cosine", "v")
    for shape in ((4, 3, 8, 8), (4, 3, 5, 8, 8)):
        ref = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        assert torch.equal(plain.noise(shape, generator=torch.Generator().manual_seed(1)), ref)
    image = d.noise((4, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    assert torch.equal(image, torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
    # the training loss and the sampler's initial noise both use it
    seen: list[torch.Tensor] = []
    d.loss(lambda x_t, t: seen.append(x_t) or torch.zeros_like(x_t), torch.zeros(2, 3, 8, 4, 4),
           t=torch.full((2,), 99), generator=torch.Generator().manual_seed(2))
    d.sample(lambda x, t, drop: seen.append(x) or torch.zeros_like(x), (2, 3, 8, 4, 4), steps=1,
             generator=torch.Generator().manual_seed(2))
    for x_t in seen:  # at t = T-1 x_t is (almost) the noise itself
        frames = x_t.permute(0, 1, 3, 4, 2).reshape(-1, 8)
        assert torch.corrcoef(frames.T)[0, 1:].mean() > 0.3
    with pytest.raises(ValueError, match="frame_noise_share"):
        Diffusion(frame_noise_share=1.0)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"min_snr_gamma": "abc"}, TypeError, "min_snr_gamma must be a number or null, got 'abc'"),
    ({"clip_sample": "1"}, TypeError, "clip_sample must be a number or null, got '1'"),
    ({"frame_noise_share": None}, TypeError, "frame_noise_share must be a number, got None"),
    ({"timesteps": 2.5}, ValueError, "timesteps must be an integer >= 2, got 2.5"),
    ({"timesteps": True}, TypeError, "timesteps must be a number, got True"),
    ({"clip_sample": -1.0}, ValueError, r"clip_sample must be positive \(or null\), got -1.0"),
])
def test_bad_options_name_themselves(kwargs: dict, error: type, message: str) -> None:
    """Options arrive from untyped YAML dicts (``diffusion: {...}``): a wrong type is named, not a bare TypeError."""
    with pytest.raises(error, match=f"^{message}$"):
        Diffusion(**kwargs)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_final_denoise_is_one_more_call_whose_x0_is_returned(objective: str) -> None:
    """``final_denoise=k``: the sampler's result goes through the network once more at timestep k, and the x0 that
    output implies (clipped) is returned; an oracle's x0 survives it."""
    d = Diffusion(1000, "cosine", objective, clip_sample=1.0)
    shape = SHAPES["4d"]
    calls: list[torch.Tensor] = []

    def recorded(x_t: torch.Tensor, t: torch.Tensor, drop_cond=False) -> torch.Tensor:
        calls.append(t.clone())
        return toy_model(x_t, t, drop_cond)

    generator = torch.Generator().manual_seed(0)
    plain = d.sample(recorded, shape, steps=5, sampler="ddim", generator=generator)
    calls.clear()
    out = d.sample(recorded, shape, steps=5, sampler="ddim", generator=torch.Generator().manual_seed(0),
                   final_denoise=10)
    assert len(calls) == 6 and torch.equal(calls[-1], torch.full((shape[0],), 10))
    t = torch.full((shape[0],), 10)
    expected = d.predict_x0(plain, t, toy_model(plain, t)).clamp(-1, 1)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, plain)
    x0 = torch.rand(shape) * 2 - 1
    recovered = d.sample(oracle(d, x0), shape, steps=8, sampler="ddim", generator=torch.Generator().manual_seed(0),
                         final_denoise=10)
    assert (recovered - x0).abs().max() < 1e-4


@pytest.mark.parametrize("value", [1000, -1, 2.5, True])
def test_final_denoise_must_be_a_timestep(value) -> None:
    with pytest.raises(ValueError, match=r"^final_denoise must be a timestep in \[0, 1000\) or null, got "):
        Diffusion().sample(toy_model, (1, 2), steps=2, final_denoise=value)
