"""Karlo's prior (diffusers PriorTransformer) as our Prior, and Karlo's parameterisation in Diffusion: the "unclip"
sampler (UnCLIPScheduler, Karlo's pipeline loop and guidance) and the learned-variance (IDDPM learned_range) loss."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from diffusers import PriorTransformer, UnCLIPScheduler
from diffusers.utils.torch_utils import randn_tensor

from lightning_mav.diffusion import Diffusion
from lightning_mav.karlo.prior import PRIOR_DEFAULTS, prior_kwargs_from_diffusers, prior_state_from_diffusers
from lightning_mav.nn.prior import Prior

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2, "embedding_dim": 16,
        "num_embeddings": 7, "additional_embeddings": 4}
# kakaobrain/karlo-v1-alpha prior/config.json (keys added to diffusers later take their defaults)
KARLO_PRIOR_CONFIG = {"_class_name": "PriorTransformer", "_diffusers_version": "0.12.0.dev0",
                      "additional_embeddings": 4, "attention_head_dim": 64, "dropout": 0.0, "embedding_dim": 768,
                      "num_attention_heads": 32, "num_embeddings": 77, "num_layers": 20}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def tiny_prior_transformer(**overrides) -> PriorTransformer:
    """A random PriorTransformer; its zero-initialised tensors (positions, prd query, clip stats) randomised too."""
    torch.manual_seed(0)
    pt = PriorTransformer(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for name, p in pt.named_parameters():
            p.add_(torch.randn_like(p) * 0.2)
        pt.clip_std.copy_(0.5 + torch.rand_like(pt.clip_std))
    return pt


def converted(pt: PriorTransformer) -> Prior:
    kwargs = prior_kwargs_from_diffusers(dict(pt.config), source="tiny")
    prior = Prior(**kwargs).eval()
    prior.load_state_dict(prior_state_from_diffusers(pt.state_dict(), kwargs, source="tiny"), strict=True)
    return prior


# ------------------------------------------------------------------------------------------------------ the prior
def test_converted_prior_predicts_as_prior_transformer() -> None:
    pt = tiny_prior_transformer()
    prior = converted(pt)
    assert "null_text_embed" not in dict(prior.named_parameters())
    assert not prior.clip_mean.requires_grad and not prior.clip_std.requires_grad
    b, length, d = 3, TINY["num_embeddings"], TINY["embedding_dim"]
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 3:] = False  # a short caption: padding after its EOT
    mask[2, 5:] = False
    y_t, e_x, hidden = torch.randn(b, d), torch.randn(b, d), torch.randn(b, length, d)
    t = torch.tensor([0, 500, 999])
    with torch.no_grad():
        ref = pt(y_t, timestep=t, proj_embedding=e_x, encoder_hidden_states=hidden,
                 attention_mask=mask).predicted_image_embedding
        ours = prior(y_t, t, text_embed=e_x, text_hidden=hidden, text_mask=mask)
        # Karlo's pipeline passes one 0-d timestep for the whole batch
        ref_scalar = pt(y_t, timestep=torch.tensor(250), proj_embedding=e_x, encoder_hidden_states=hidden,
                        attention_mask=mask).predicted_image_embedding
        ours_scalar = prior(y_t, torch.full((b,), 250), text_embed=e_x, text_hidden=hidden, text_mask=mask)
    assert rel_err(ours, ref) <= 1e-4, rel_err(ours, ref)
    assert rel_err(ours_scalar, ref_scalar) <= 1e-4
    assert not torch.allclose(ours[0], ours[1])

    y = torch.randn(b, d)
    torch.testing.assert_close(prior.unnormalize(y), pt.post_process_latents(y), rtol=0, atol=1e-6)
    torch.testing.assert_close(prior.normalize(prior.unnormalize(y)), y, rtol=1e-5, atol=1e-5)
    plain = Prior(embed_dim=d, text_width=d, max_text_len=length, dim=16, depth=1, heads=2, dim_head=8)
    assert plain.normalize(y) is y and plain.unnormalize(y) is y  # no stats: identity


def test_full_karlo_prior_parameter_counts_match_on_meta() -> None:
    assert PRIOR_DEFAULTS == {k: p.default for k, p in inspect.signature(PriorTransformer.__init__).parameters.items()
                              if k != "self"}
    with torch.device("meta"):
        pt = PriorTransformer()
    kwargs = prior_kwargs_from_diffusers(dict(pt.config), source="karlo")
    assert kwargs == prior_kwargs_from_diffusers(KARLO_PRIOR_CONFIG, source="karlo/prior/config.json")
    assert kwargs == dict(embed_dim=768, text_width=768, max_text_len=77, dim=2048, depth=20, heads=32, dim_head=64,
                          mlp_ratio=4.0, dropout=0.0, qkv_bias=True, text_null="none", embed_stats=True)
    with torch.device("meta"):
        prior = Prior(**kwargs)
    count = sum(p.numel() for p in prior.parameters())
    assert count == sum(p.numel() for p in pt.parameters())
    # every one of its tensors converts (meta tensors: shapes only)
    state = prior_state_from_diffusers(pt.state_dict(), kwargs, source="karlo")
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in prior.state_dict().items()}


# --------------------------------------------------------------------------------------------------- the sampler
# Karlo's schedulers (diffusers' UnCLIPPipeline for kakaobrain/karlo-v1-alpha) and our Diffusion for each network
KARLO = {
    "prior": (dict(variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
                   clip_sample_range=5.0),
              dict(objective="x0", clip_sample=5.0), (2, 16), 4.0),
    "decoder": (dict(variance_type="learned_range", prediction_type="epsilon", num_train_timesteps=1000),
                dict(objective="eps", clip_sample=1.0, learned_variance=True), (2, 3, 4, 4), 8.0),
    "super_res": (dict(variance_type="fixed_small_log", prediction_type="epsilon", num_train_timesteps=1000),
                  dict(objective="eps", clip_sample=1.0), (2, 3, 4, 4), 1.0),
}


def fake_net(x: torch.Tensor, t: torch.Tensor, drop: torch.Tensor, learned: bool) -> torch.Tensor:
    """Deterministic stand-in; the variance half depends on the branch, so taking the wrong one shows."""
    shape = (-1, *([1] * (x.dim() - 1)))
    tt, dd = (t.float() / 1000).reshape(shape), drop.float().reshape(shape)
    out = 0.5 * x * (1 - tt) + 0.1 * torch.sin(3 * x) + 0.3 * (1 - dd)
    return torch.cat([out, torch.tanh(x + tt - dd)], dim=1) if learned else out


def karlo_loop(scheduler: UnCLIPScheduler, shape: tuple, steps: int, scale: float, generator: torch.Generator,
               learned: bool) -> torch.Tensor:
    """Karlo's pipeline loop (diffusers pipeline_unclip.py, prior and decoder), batch order [uncond, text]."""
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    latents = randn_tensor(shape, generator=generator, dtype=torch.float32) * scheduler.init_noise_sigma
    b, cfg = shape[0], scale > 1.0
    for i, t in enumerate(timesteps):
        inp = torch.cat([latents] * 2) if cfg else latents
        drop = torch.arange(inp.shape[0]) < b if cfg else torch.zeros(b, dtype=torch.bool)
        pred = fake_net(inp, t.expand(inp.shape[0]), drop, learned)
        if cfg and learned:  # the decoder: guide the eps half, keep the text branch's variance
            uncond, text = pred.chunk(2)
            uncond, _ = uncond.split(inp.shape[1], dim=1)
            text, variance = text.split(inp.shape[1], dim=1)
            pred = torch.cat([uncond + scale * (text - uncond), variance], dim=1)
        elif cfg:  # the prior: guide the whole x0 prediction
            uncond, text = pred.chunk(2)
            pred = uncond + scale * (text - uncond)
        prev = None if i + 1 == timesteps.shape[0] else timesteps[i + 1]
        latents = scheduler.step(pred, timestep=t, sample=latents, generator=generator, prev_timestep=prev).prev_sample
    return latents


@pytest.mark.parametrize("network", list(KARLO))
def test_unclip_sampler_is_karlos_pipeline_loop(network: str) -> None:
    sched_cfg, diff_cfg, shape, scale = KARLO[network]
    diffusion = Diffusion(**diff_cfg)
    ours_sched, karlo_sched = diffusion.make_scheduler("unclip"), UnCLIPScheduler(**sched_cfg)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(ours_sched.config) == public(karlo_sched.config)
    assert torch.equal(diffusion.alphas_cumprod, karlo_sched.alphas_cumprod)  # the training schedule is Karlo's too

    def model_fn(x, t, drop_cond):
        drop = torch.as_tensor(drop_cond).expand(x.shape[0]) if torch.as_tensor(drop_cond).dim() == 0 else drop_cond
        return fake_net(x, t, drop, diffusion.learned_variance)

    for cfg_batch in (True, False):
        ours = diffusion.sample(model_fn, shape, steps=3, sampler="unclip", guidance_scale=scale,
                                cfg_batch=cfg_batch, generator=torch.Generator().manual_seed(3))
        ref = karlo_loop(UnCLIPScheduler(**sched_cfg), shape, 3, scale, torch.Generator().manual_seed(3),
                         diffusion.learned_variance)
        assert rel_err(ours, ref) <= 1e-6, (network, rel_err(ours, ref))


def test_other_samplers_use_the_mean_half_of_a_learned_variance_output() -> None:
    plain, learned = Diffusion(objective="eps"), Diffusion(objective="eps", learned_variance=True)
    drop_of = lambda x, d: torch.as_tensor(d).expand(x.shape[0]) if torch.as_tensor(d).dim() == 0 else d  # noqa: E731
    for sampler in ("ddim", "ddpm", "dpm++"):
        kw = dict(steps=3, sampler=sampler, guidance_scale=3.0)
        a = plain.sample(lambda x, t, d: fake_net(x, t, drop_of(x, d), False), (2, 3, 4, 4),
                         generator=torch.Generator().manual_seed(1), **kw)
        b = learned.sample(lambda x, t, d: fake_net(x, t, drop_of(x, d), True), (2, 3, 4, 4),
                           generator=torch.Generator().manual_seed(1), **kw)
        assert torch.equal(a, b), sampler


# ----------------------------------------------------------------------------------------- learned-variance loss
def test_learned_variance_loss() -> None:
    d = Diffusion(objective="eps", learned_variance=True)
    x0, noise = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    t = torch.tensor([0, 1, 500, 999])
    x_t = d.q_sample(x0, t, noise)
    out = torch.nn.Parameter(torch.randn(4, 6, 4, 4))

    loss = d.loss(lambda x, tt: out, x0, noise=noise, t=t)
    assert torch.isfinite(loss)
    # the eps part is the plain eps loss; the rest is the VLB term, averaged like the MSE
    plain = Diffusion(objective="eps").loss(lambda x, tt: out[:, :3], x0, noise=noise, t=t)
    torch.testing.assert_close(loss, plain + d.vlb(x0, x_t, t, out).mean(), rtol=1e-6, atol=0)
    weights = torch.tensor([1.0, 0.0, 2.0, 1.0])
    weighted = d.loss(lambda x, tt: out, x0, noise=noise, t=t, weights=weights)
    w = weights[:, None, None, None].expand_as(x0)
    expected = (((out[:, :3] - noise) ** 2 + d.vlb(x0, x_t, t, out)) * w).sum() / w.sum()
    torch.testing.assert_close(weighted, expected, rtol=1e-6, atol=0)

    # the VLB trains only the variance half
    d.vlb(x0, x_t, t, out).mean().backward()
    assert torch.equal(out.grad[:, :3], torch.zeros_like(out.grad[:, :3]))
    assert (out.grad[:, 3:].abs() > 0).all()

    # zero for the exact mean and the posterior's variance (v = -1; at t = 0 IDDPM's clipped posterior variance)
    exact = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    assert d.vlb(x0, x_t, t, exact).abs().max() < 1e-5
    # ... and positive for another variance (small but for the first steps: later β̃_t ≈ β_t, so v barely matters)
    other = d.vlb(x0, x_t, t, torch.cat([noise, torch.zeros_like(noise)], dim=1))
    assert (other[:3] > 0).all() and (other[:2] > 1e-2).all()

    # the value: KL(q ‖ p) in bits × T/1000 (IDDPM's hybrid loss), here in float64 from the betas; p's log-variance
    # is UnCLIPScheduler's learned_range (which computes it in float32: ~1e-3 off in the log at t = 1)
    sched = UnCLIPScheduler(variance_type="learned_range")
    betas = sched.betas.double()
    a = torch.cumprod(1 - betas, 0)
    for i in (1, 2, 3):
        ti, v = int(t[i]), out[i, 3:].detach().double()
        beta, a_t, a_prev = betas[ti], a[ti], a[ti - 1]
        log_var_q = (beta * (1 - a_prev) / (1 - a_t)).log()
        log_var_p = (v + 1) / 2 * beta.log() + (1 - v) / 2 * log_var_q
        sched_log_var = sched._get_variance(ti, predicted_variance=v.float(), variance_type="learned_range")
        torch.testing.assert_close(sched_log_var.double(), log_var_p, rtol=0, atol=2e-3)
        coef_x0, coef_xt = a_prev.sqrt() * beta / (1 - a_t), (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)
        x0_pred = (x_t[i].double() - (1 - a_t).sqrt() * out[i, :3].detach().double()) / a_t.sqrt()
        mean_q, mean_p = coef_x0 * x0[i].double() + coef_xt * x_t[i], coef_x0 * x0_pred + coef_xt * x_t[i]
        kl = 0.5 * (-1 + log_var_p - log_var_q + (log_var_q - log_var_p).exp() + (mean_q - mean_p) ** 2
                    * (-log_var_p).exp())
        ours = d.vlb(x0[i:i + 1], x_t[i:i + 1], t[i:i + 1], out[i:i + 1].detach())[0].double()
        assert rel_err(ours, kl / math.log(2)) < 1e-4, (ti, rel_err(ours, kl / math.log(2)))


def test_min_snr_weighs_only_the_mse() -> None:
    x0, noise, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([1, 300, 900])
    out = torch.randn(3, 4, 4, 4)
    snr = Diffusion(objective="eps", min_snr_gamma=5.0, learned_variance=True)
    x_t = snr.q_sample(x0, t, noise)
    mse = Diffusion(objective="eps", min_snr_gamma=5.0).loss(lambda x, tt: out[:, :2], x0, noise=noise, t=t)
    torch.testing.assert_close(snr.loss(lambda x, tt: out, x0, noise=noise, t=t),
                               mse + snr.vlb(x0, x_t, t, out).mean(), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("change", "message"), [
    ({"norm_in_type": "layer"}, "src: norm_in_type is 'layer', expected None (no input LayerNorm)"),
    ({"added_emb_type": None}, "src: added_emb_type is None, expected 'prd' (the learned query token read out)"),
    ({"embedding_proj_norm_type": "layer"}, "src: embedding_proj_norm_type is 'layer', expected None"),
    ({"encoder_hid_proj_type": None}, "src: encoder_hid_proj_type is None, expected 'linear'"),
    ({"time_embed_act_fn": "gelu"}, "src: time_embed_act_fn is 'gelu', expected 'silu'"),
    ({"time_embed_dim": 32}, "src: time_embed_dim is 32, expected None or the inner dim 2048"),
    ({"additional_embeddings": 3}, "src: additional_embeddings is 3, expected 4"),
    ({"clip_embed_dim": 512}, "src: clip_embed_dim is 512, expected None or embedding_dim 768"),
    ({"cross_attention_dim": 5}, "src: cross_attention_dim is 5, expected no such key"),
])
def test_unsupported_config_names_source_and_key(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")) as err:
        prior_kwargs_from_diffusers({**KARLO_PRIOR_CONFIG, **change}, source="src")
    assert "\n" not in str(err.value)


def test_bad_state_names_source_key_and_shapes() -> None:
    pt = tiny_prior_transformer()
    kwargs = prior_kwargs_from_diffusers(dict(pt.config), source="ckpt")
    state = pt.state_dict()
    cases = {
        "src: missing key proj_in.bias": {k: v for k, v in state.items() if k != "proj_in.bias"},
        r"src: transformer_blocks.1.attn1.to_k.weight has shape \(16, 8\), expected \(16, 16\)":
            {**state, "transformer_blocks.1.attn1.to_k.weight": torch.zeros(16, 8)},
        r"src: proj_to_clip_embeddings.weight has shape \(8, 16\), expected \(16, 16\) \(for out.weight\)":
            {**state, "proj_to_clip_embeddings.weight": torch.zeros(8, 16)},
        r"src: positional_embedding has shape \(1, 10, 16\), expected \(1, 11, 16\)":
            {**state, "positional_embedding": torch.zeros(1, 10, 16)},
        r"src: unexpected key extra.weight \(1 unused in all\)": {**state, "extra.weight": torch.zeros(1)},
    }
    for message, bad in cases.items():
        with pytest.raises(ValueError, match="^" + message + "$") as err:
            prior_state_from_diffusers(bad, kwargs, source="src")
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="^drop_cond needs text_null='learned'"):
        converted(pt)(torch.zeros(1, 16), torch.zeros(1), text_embed=torch.zeros(1, 16),
                      text_hidden=torch.zeros(1, 7, 16), text_mask=torch.ones(1, 7), drop_cond=torch.ones(1))


def test_unclip_rejects_what_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="^sampler 'unclip' needs objective 'eps' or 'x0': UnCLIPScheduler has no v"):
        Diffusion(objective="v").make_scheduler("unclip")
    with pytest.raises(ValueError, match="^sampler 'unclip' needs schedule 'cosine'.*got 'linear'$"):
        Diffusion(schedule="linear").make_scheduler("unclip")
    with pytest.raises(ValueError, match="^sampler 'unclip' needs at least 2 steps, got 1$"):
        Diffusion().sample(lambda x, t, d: x, (1, 2), steps=1, sampler="unclip")
    with pytest.raises(ValueError, match=r"^learned_variance needs an output of shape \(2, 6, 4, 4\)"):
        Diffusion(learned_variance=True).loss(lambda x, t: x, torch.zeros(2, 3, 4, 4))
    with pytest.raises(TypeError, match="^learned_variance must be true or false, got 'yes'$"):
        Diffusion(learned_variance="yes")
