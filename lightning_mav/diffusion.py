"""Gaussian diffusion: training objective, noise schedules, samplers and classifier-free guidance.

The schedule, ``q_sample``, the velocity target and every sampling step come from diffusers' schedulers
(``DDPMScheduler``, ``DDIMScheduler``, ``DPMSolverMultistepScheduler``, and Karlo's ``UnCLIPScheduler``), which
broadcast over any tensor rank,
so the same :class:`Diffusion` serves the prior (2-D embeddings ``[B, D]``), the image networks (``[B, C, H, W]``)
and the video networks (``[B, C, F, H, W]``). Only the loss and the guidance loop are written here.

Model-function conventions
    training:  ``model_fn(x_t [B,...], t [B] long) -> output [B,...]``
    sampling:  ``model_fn(x_t, t, drop_cond) -> output`` where ``drop_cond`` is ``False`` (conditional branch),
               ``True`` (null conditioning) or, with ``cfg_batch=True``, a bool tensor ``[2B]`` whose first half
               is False and second half True; the model function then sees a doubled batch ``x_t [2B,...]`` and
               repeats its conditioning to match (``repeat_to_batch`` below does exactly that).
The output is the objective's target: ``eps`` the noise, ``v`` the velocity ``sqrt(a)·eps - sqrt(1-a)·x0``,
``x0`` the clean sample. With ``learned_variance`` it has twice the channels (dim 1): the target, then the
variance interpolation ``v`` in [-1, 1] of IDDPM's "learned_range" (Karlo's decoder).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UnCLIPScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

Objective = Literal["eps", "v", "x0"]
Sampler = Literal["ddim", "ddpm", "dpm++", "unclip"]

SCHEDULES = {"cosine": "squaredcos_cap_v2", "linear": "linear"}
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def repeat_to_batch(cond: Tensor | None, batch: int) -> Tensor | None:
    """Repeat a conditioning tensor ``[B, ...]`` along dim 0 to ``batch`` rows (``batch`` a multiple of B).

    Used by model functions under batched classifier-free guidance, where ``x_t`` arrives as ``[2B, ...]``.
    """
    if cond is None or cond.shape[0] == batch:
        return cond
    return cond.repeat(batch // cond.shape[0], *([1] * (cond.dim() - 1)))


def _expand_like(values: Tensor, x: Tensor) -> Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` with as many dims as ``x``."""
    return values.reshape(-1, *([1] * (x.dim() - 1))).to(x)


class Diffusion:
    """Discrete-time Gaussian diffusion over ``timesteps`` steps.

    Args:
        timesteps: number of training timesteps T.
        schedule: ``"cosine"`` (Nichol & Dhariwal, diffusers' ``squaredcos_cap_v2``) or ``"linear"`` (DDPM betas).
        objective: what the network predicts: ``"eps"``, ``"v"`` or ``"x0"``.
        clip_sample: clamp the predicted x0 to ``[-clip_sample, clip_sample]`` while sampling (images in
            [-1, 1] want 1.0); ``None`` for unbounded data such as CLIP embeddings.
        min_snr_gamma: Min-SNR-γ loss weighting (Hang et al. 2023; γ = 5 in the paper): each timestep's loss is
            weighted so that it equals ``min(SNR_t, γ)`` times the x0 error, i.e. the nearly clean timesteps
            (SNR ≫ γ), whose fine detail would otherwise dominate the gradient, no longer crowd out the noisy ones
            that shape the image. ``None``: the plain MSE of the objective.
        frame_noise_share: for videos ``[B, C, F, H, W]``, the fraction of the noise variance shared by all frames
            (PYoCo's "mixed" noise prior, Ge et al. 2023: ``sqrt(s)·ε_shared + sqrt(1-s)·ε_f``, each frame still
            N(0, I)), in training and in the initial noise of sampling. An image model fine-tuned into a video
            model (D -> D_t) then starts from frames that already agree and only has to learn how they differ,
            instead of learning to undo independent per-frame noise; PYoCo reports it as the key to fine-tuning
            with little video. 0 (default): independent noise per frame, as in Make-A-Video. Images are unaffected.
        learned_variance: the network also predicts the reverse-step variance (IDDPM's "learned_range", Nichol &
            Dhariwal 2021; Karlo's decoder): its output has 2C channels on dim 1, the objective's output then
            ``v`` in [-1, 1], the log-variance being ``(v+1)/2 · log β_t + (1-v)/2 · log β̃_t`` (β̃_t the posterior
            variance). Training adds IDDPM's VLB term on the variance (:meth:`vlb`); sampling with ``"unclip"``
            uses the variance, the other samplers only the first half (the mean), as with fixed variances.

    Not an ``nn.Module`` on purpose: it has no parameters, so nothing of it lands in a checkpoint.
    """

    def __init__(
        self,
        timesteps: int = 1000,
        schedule: Literal["cosine", "linear"] = "cosine",
        objective: Objective = "eps",
        clip_sample: float | None = None,
        min_snr_gamma: float | None = None,
        frame_noise_share: float = 0.0,
        learned_variance: bool = False,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
        if objective not in PREDICTION_TYPES:
            raise ValueError(f"objective must be one of {list(PREDICTION_TYPES)}, got {objective!r}")
        # configs reach here as untyped dicts (``diffusion: {...}`` in a YAML): check types before comparing
        for name, value, optional in (("timesteps", timesteps, False), ("clip_sample", clip_sample, True),
                                      ("min_snr_gamma", min_snr_gamma, True),
                                      ("frame_noise_share", frame_noise_share, False)):
            if not (value is None and optional) and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TypeError(f"{name} must be a number{' or null' if optional else ''}, got {value!r}")
        if not isinstance(learned_variance, bool):
            raise TypeError(f"learned_variance must be true or false, got {learned_variance!r}")
        if not isinstance(timesteps, int) or timesteps < 2:
            raise ValueError(f"timesteps must be an integer >= 2, got {timesteps!r}")
        if clip_sample is not None and clip_sample <= 0:
            raise ValueError(f"clip_sample must be positive (or null), got {clip_sample}")
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive (or null), got {min_snr_gamma}")
        if not 0.0 <= frame_noise_share < 1.0:
            raise ValueError(f"frame_noise_share must be in [0, 1), got {frame_noise_share}")
        self.timesteps, self.schedule, self.objective, self.clip_sample = timesteps, schedule, objective, clip_sample
        self.min_snr_gamma, self.frame_noise_share = min_snr_gamma, frame_noise_share
        self.learned_variance = learned_variance
        self._config = dict(
            num_train_timesteps=timesteps,
            beta_schedule=SCHEDULES[schedule],
            prediction_type=PREDICTION_TYPES[objective],
            # "trailing" starts sampling at t = T-1 (pure noise) even with few steps (Lin et al. 2023, Table 2)
            timestep_spacing="trailing",
        )
        # the training-side scheduler only provides alphas_cumprod, add_noise and get_velocity (all stateless)
        self._train = DDPMScheduler(**self._config, clip_sample=False)
        self.alphas_cumprod: Tensor = self._train.alphas_cumprod.clone()  # [T] float32, ᾱ_t
        if learned_variance:  # q(x_{t-1} | x_t, x0) in float64 (as IDDPM), then float32: [T] each
            betas = self._train.betas.double()
            a = torch.cumprod(1 - betas, 0)
            a_prev = torch.cat([a.new_ones(1), a[:-1]])
            var = betas * (1 - a_prev) / (1 - a)
            self._posterior = {
                "coef_x0": (betas * a_prev.sqrt() / (1 - a)).float(),
                "coef_xt": ((1 - a_prev) * (1 - betas).sqrt() / (1 - a)).float(),
                # β̃_0 = 0: IDDPM's posterior_log_variance_clipped uses β̃_1 at t = 0
                "log_var": torch.cat([var[1:2], var[1:]]).log().float(),
                "log_beta": betas.log().float(),
            }

    def __repr__(self) -> str:
        return (f"Diffusion(timesteps={self.timesteps}, schedule={self.schedule!r}, objective={self.objective!r}, "
                f"clip_sample={self.clip_sample}, min_snr_gamma={self.min_snr_gamma}, "
                f"frame_noise_share={self.frame_noise_share}, learned_variance={self.learned_variance})")

    def snr_weight(self, t: Tensor) -> Tensor:
        """Min-SNR-γ weight ``[B]`` of the objective's squared error at timesteps ``t`` ``[B]``.

        In x0 terms the eps error carries SNR_t, the v error SNR_t + 1 and the x0 error 1; the weight turns each into
        ``min(SNR_t, γ)``.
        """
        a = self.alphas_cumprod.to(t.device)[t.long()]
        snr = a / (1 - a).clamp_min(1e-20)
        clipped = snr.clamp(max=self.min_snr_gamma)
        return {"eps": clipped / snr.clamp_min(1e-20), "v": clipped / (snr + 1), "x0": clipped}[self.objective]

    # ------------------------------------------------------------------ forward process and targets
    def noise(self, shape: Sequence[int], *, generator: torch.Generator | None = None,
              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normal noise of ``shape``; for a video ``[B, C, F, H, W]`` with ``frame_noise_share`` of its
        variance common to all frames."""
        device = torch.device(device or "cpu")
        eps = randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype)
        if self.frame_noise_share == 0 or len(shape) != 5:
            return eps
        b, c, _, h, w = shape
        shared = randn_tensor((b, c, 1, h, w), generator=generator, device=device, dtype=dtype)
        return self.frame_noise_share ** 0.5 * shared + (1 - self.frame_noise_share) ** 0.5 * eps

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·noise.   x0, noise ``[B, ...]``; t ``[B]`` long."""
        return self._train.add_noise(x0, noise, t)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The regression target of the objective, shape of ``x0``."""
        if self.objective == "eps":
            return noise
        if self.objective == "v":
            return self._train.get_velocity(x0, noise, t)
        return x0

    def _coefs(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        a = self.alphas_cumprod.to(device=x.device, dtype=x.dtype)[t.to(x.device).long()]  # cast first, like diffusers
        return _expand_like(a.sqrt(), x), _expand_like((1 - a).sqrt(), x)

    def predict_x0(self, x_t: Tensor, t: Tensor, output: Tensor) -> Tensor:
        """Clean sample implied by a model output (any objective).   All ``[B, ...]``; t ``[B]``."""
        sa, s1a = self._coefs(t, x_t)
        if self.objective == "eps":
            return (x_t - s1a * output) / sa
        if self.objective == "v":
            return sa * x_t - s1a * output
        return output

    def predict_eps(self, x_t: Tensor, t: Tensor, output: Tensor) -> Tensor:
        """Noise implied by a model output (any objective).   All ``[B, ...]``; t ``[B]``."""
        sa, s1a = self._coefs(t, x_t)
        if self.objective == "eps":
            return output
        if self.objective == "v":
            return s1a * x_t + sa * output
        return (x_t - sa * output) / s1a

    # ------------------------------------------------------------------ training
    def loss(
        self,
        model_fn: Callable[[Tensor, Tensor], Tensor],
        x0: Tensor,
        *,
        noise: Tensor | None = None,
        t: Tensor | None = None,
        weights: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Mean squared error between ``model_fn(x_t, t)`` and the objective's target.

        With ``learned_variance`` the MSE is on the output's first half and IDDPM's VLB term (:meth:`vlb`) on the
        variance half is added, averaged (and weighted) like the MSE; Min-SNR weights only the MSE.

        Args:
            x0: clean data ``[B, ...]`` (any rank).
            noise: ``[B, ...]``; drawn from ``generator`` (:meth:`noise`) when None.
            t: timesteps ``[B]`` long; uniform over ``[0, T)`` from ``generator`` when None.
            weights: ``[B]`` per-sample or broadcastable to ``x0`` (e.g. a frame mask); the loss is then the
                weighted mean of the squared error.
            generator: makes t and noise reproducible (the stages seed it for validation).
        Returns:
            scalar loss (float32).
        """
        b = x0.shape[0]
        if t is None:
            gen_device = generator.device if generator is not None else x0.device
            t = torch.randint(0, self.timesteps, (b,), generator=generator, device=gen_device).to(x0.device)
        if noise is None:
            noise = self.noise(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        output = model_fn(x_t, t)
        vlb = None
        if self.learned_variance:
            vlb = self.vlb(x0, x_t, t, output)
            output = output[:, :x0.shape[1]]
        sq_err = F.mse_loss(output.float(), self.target(x0, noise, t).float(), reduction="none")
        if self.min_snr_gamma is not None:
            sq_err = sq_err * _expand_like(self.snr_weight(t), sq_err)
        if vlb is not None:
            sq_err = sq_err + vlb
        if weights is None:
            return sq_err.mean()
        w = _expand_like(weights, sq_err) if weights.dim() == 1 else weights.to(sq_err)
        w = w.expand_as(sq_err)
        return (sq_err * w).sum() / w.sum().clamp_min(1e-8)

    def vlb(self, x0: Tensor, x_t: Tensor, t: Tensor, output: Tensor) -> Tensor:
        """IDDPM's hybrid-loss VLB term on the learned variance, per element ``[B, C, ...]`` float32.

        ``KL(q(x_{t-1}|x_t,x0) ‖ p(x_{t-1}|x_t))`` between Gaussians, in bits, times ``T/1000``: λ·L_vlb with
        λ = 0.001 and L_vlb = Σ_t L_t estimated by T·L_t at the uniformly drawn t (``terms["vb"] *= num_timesteps
        / 1000`` in improved_diffusion). p's mean comes from the detached first half, so the term trains only the
        variance, as IDDPM's ``frozen_out``. At t = 0 it is the same KL against the posterior with IDDPM's
        ``posterior_log_variance_clipped`` (β̃_1; β̃_0 is 0), not IDDPM's discretised decoder likelihood.

        Args:
            x0: clean data ``[B, C, ...]``; x_t: noised ``[B, C, ...]``; t: ``[B]`` long.
            output: the network's ``[B, 2C, ...]`` (objective's output, then ``v`` in [-1, 1]).
        """
        c = x0.shape[1]
        if output.shape[1] != 2 * c or output.shape[2:] != x0.shape[2:] or output.shape[0] != x0.shape[0]:
            raise ValueError(f"learned_variance needs an output of shape {(x0.shape[0], 2 * c, *x0.shape[2:])} "
                             f"(objective's output, then the variance), got {tuple(output.shape)}")
        mean_out, v = output.float().split(c, dim=1)
        x0, x_t = x0.float(), x_t.float()
        t = t.to(x0.device).long()
        post = {k: _expand_like(val.to(x0.device)[t], x0) for k, val in self._posterior.items()}
        true_mean = post["coef_x0"] * x0 + post["coef_xt"] * x_t
        pred_mean = post["coef_x0"] * self.predict_x0(x_t, t, mean_out.detach()) + post["coef_xt"] * x_t
        frac = (v + 1) / 2
        log_var = frac * post["log_beta"] + (1 - frac) * post["log_var"]
        kl = 0.5 * (-1.0 + log_var - post["log_var"] + torch.exp(post["log_var"] - log_var)
                    + (true_mean - pred_mean) ** 2 * torch.exp(-log_var))
        return kl * (self.timesteps / 1000.0 / math.log(2.0))

    # ------------------------------------------------------------------ low-resolution conditioning (SR)
    def noise_lowres(
        self,
        lowres: Tensor,
        level: float | Tensor,
        *,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Noise-augment a conditioning image (Imagen / Cascaded Diffusion's conditioning augmentation).

        ``level`` in [0, 1] is a fraction of the schedule: the image is forward-diffused to
        ``t = round(level·(T-1))``. Training draws a random level per sample so the super-resolution network
        learns to ignore artefacts of the stage below; sampling uses one fixed, small level.

        Args:
            lowres: ``[B, C, h, w]`` or ``[B, C, F, h, w]`` in [-1, 1].
            level: float or ``[B]``.
            noise: optional, shape of ``lowres`` (e.g. identical per frame).
        Returns:
            (noised lowres, the applied timestep ``[B]`` float — the U-Net's ``lowres_noise_level``, which is
            embedded on the timestep scale like ``t``).
        """
        b = lowres.shape[0]
        level = torch.as_tensor(level, dtype=torch.float32, device=lowres.device).expand(b)
        t = (level.clamp(0, 1) * (self.timesteps - 1)).round().long()
        if noise is None:
            noise = randn_tensor(lowres.shape, generator=generator, device=lowres.device, dtype=lowres.dtype)
        # level 0 must leave the image untouched (ᾱ_0 < 1 would still add a little noise)
        untouched = (t == 0).reshape(-1, *([1] * (lowres.dim() - 1)))
        noised = torch.where(untouched, lowres, self.q_sample(lowres, t, noise))
        return noised, t.float()

    # ------------------------------------------------------------------ sampling
    def make_scheduler(
        self, sampler: Sampler = "ddim",
    ) -> DDPMScheduler | DDIMScheduler | DPMSolverMultistepScheduler | UnCLIPScheduler:
        """A fresh sampling scheduler: diffusers' schedulers keep per-run state (step index, solver history).

        ``"unclip"`` is Karlo's ``UnCLIPScheduler`` (ancestral DDPM over the skipped steps, β recomputed between
        the visited timesteps; "learned_range" with ``learned_variance`` else "fixed_small_log"); it needs the
        cosine schedule and the eps or x0 objective.
        """
        clip = self.clip_sample is not None
        clip_range = float(self.clip_sample) if clip else 1.0
        if sampler == "unclip":
            if self.objective == "v":
                raise ValueError("sampler 'unclip' needs objective 'eps' or 'x0': UnCLIPScheduler has no v prediction")
            if self.schedule != "cosine":
                raise ValueError(f"sampler 'unclip' needs schedule 'cosine' (UnCLIPScheduler's squaredcos_cap_v2), "
                                 f"got {self.schedule!r}")
            return UnCLIPScheduler(
                num_train_timesteps=self.timesteps, beta_schedule="squaredcos_cap_v2",
                variance_type="learned_range" if self.learned_variance else "fixed_small_log",
                prediction_type=PREDICTION_TYPES[self.objective], clip_sample=clip, clip_sample_range=clip_range,
            )
        if sampler == "ddpm":
            return DDPMScheduler(**self._config, clip_sample=clip, clip_sample_range=clip_range)
        if sampler == "ddim":
            return DDIMScheduler(**self._config, clip_sample=clip, clip_sample_range=clip_range, set_alpha_to_one=True)
        if sampler == "dpm++":
            # DPM-Solver++ has no clip_sample; dynamic thresholding with max value c clamps x0 to [-c, c]
            # (exactly static clipping for c = 1). diffusers advises lambda_min_clipped for the cosine schedule.
            return DPMSolverMultistepScheduler(
                **self._config, algorithm_type="dpmsolver++", solver_order=2,
                thresholding=clip, sample_max_value=clip_range,
                lambda_min_clipped=-5.1 if self.schedule == "cosine" else -float("inf"),
            )
        raise ValueError(f"sampler must be 'ddim', 'ddpm', 'dpm++' or 'unclip', got {sampler!r}")

    def check_final_denoise(self, final_denoise: int | None) -> None:
        """Raise unless ``final_denoise`` is None or a timestep in ``[0, T)``."""
        if final_denoise is not None and (isinstance(final_denoise, bool) or not isinstance(final_denoise, int)
                                          or not 0 <= final_denoise < self.timesteps):
            raise ValueError(f"final_denoise must be a timestep in [0, {self.timesteps}) or null, "
                             f"got {final_denoise!r}")

    @staticmethod
    def guided(
        model_fn: Callable[[Tensor, Tensor, bool | Tensor], Tensor],
        x: Tensor,
        t: Tensor,
        guidance_scale: float = 1.0,
        cfg_batch: bool = True,
        learned_variance: bool = False,
    ) -> Tensor:
        """Classifier-free guidance: ``uncond + s·(cond - uncond)``; s == 1 runs the conditional branch only.

        With ``cfg_batch`` both branches go through one call on a doubled batch, which halves the number of
        network launches per step (what dominates sampling at small batch sizes) at the cost of twice the
        activation memory; switch it off for very large batches or for model functions that take a plain bool.
        With ``learned_variance`` (outputs ``[B, 2C, ...]``) only the first half is guided and the variance half is
        the conditional branch's, as in Karlo's pipeline.
        """
        if guidance_scale == 1.0:
            return model_fn(x, t, False)
        if cfg_batch:
            b = x.shape[0]
            drop = torch.arange(2 * b, device=x.device) >= b
            cond, uncond = model_fn(torch.cat([x, x]), torch.cat([t, t]), drop).chunk(2)
        else:
            cond, uncond = model_fn(x, t, False), model_fn(x, t, True)
        if learned_variance:
            c = x.shape[1]
            (cond, variance), uncond = cond.split(c, dim=1), uncond[:, :c]
            return torch.cat([uncond + guidance_scale * (cond - uncond), variance], dim=1)
        return uncond + guidance_scale * (cond - uncond)

    @torch.no_grad()
    def sample(
        self,
        model_fn: Callable[[Tensor, Tensor, bool | Tensor], Tensor],
        shape: Sequence[int] | None = None,
        *,
        steps: int = 50,
        sampler: Sampler = "ddim",
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        progress: bool = False,
        cfg_batch: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        final_denoise: int | None = None,
    ) -> Tensor:
        """Run the reverse process from pure noise to x0.

        Args:
            model_fn: ``(x_t, t [B], drop_cond) -> output`` (see the module docstring).
            shape: ``[B, ...]`` of the sample (any rank); or give ``noise``.
            steps: number of sampling steps (trailing spacing, so the first step is at t = T-1; ``"unclip"``:
                Karlo's ``round(i·(T-1)/(steps-1))``, at least 2 steps, the last at t = 0).
            sampler: ``"ddim"`` (deterministic, eta 0), ``"ddpm"`` (ancestral), ``"dpm++"`` (DPM-Solver++ 2M) or
                ``"unclip"`` (Karlo's UnCLIPScheduler, each step told the next timestep as Karlo's pipeline does).
            guidance_scale: classifier-free guidance scale; 1 disables guidance (one call per step).
            generator: seeds the initial noise and the DDPM step noise: same seed, same sample.
            noise: initial x_T ``[B, ...]`` (e.g. SR_h's identical noise for every frame).
            cfg_batch: batch the two guidance branches into one call (see :meth:`guided`).
            final_denoise: after the last step, one more network call at this timestep takes the result for
                ``x_t`` there and returns its x0 prediction (the final denoising step of Karras et al. 2022). A
                briefly trained network's last x0 prediction keeps noise of a small timestep's level, seen as grain
                on flat areas; this call removes it (docs/choices.md#sr-stages-final-denoising-step). None: off.
        Returns:
            x0 ``[B, ...]``.
        """
        self.check_final_denoise(final_denoise)
        if noise is None:
            if shape is None:
                raise ValueError("give a shape or the initial noise")
            x = self.noise(shape, generator=generator, device=device, dtype=dtype)
        else:
            x = noise.to(device=device or noise.device)
        scheduler = self.make_scheduler(sampler)
        unclip = isinstance(scheduler, UnCLIPScheduler)
        if unclip and steps < 2:
            raise ValueError(f"sampler 'unclip' needs at least 2 steps, got {steps}")
        scheduler.set_timesteps(steps, device=x.device)
        x = x * scheduler.init_noise_sigma
        timesteps = scheduler.timesteps
        iterator = timesteps
        if progress:
            from tqdm.auto import tqdm
            iterator = tqdm(timesteps, desc=f"{sampler} sampling", leave=False)
        for i, t in enumerate(iterator):
            t_batch = t.to(x.device).long().expand(x.shape[0])
            output = self.guided(model_fn, scheduler.scale_model_input(x, t), t_batch, guidance_scale, cfg_batch,
                                 self.learned_variance)
            if unclip:  # splits off the variance half itself; None after the last step means t - 1
                prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
                x = scheduler.step(output, t, x, prev_timestep=prev, generator=generator).prev_sample
                continue
            if self.learned_variance:  # the other samplers use the mean only
                output = output[:, :x.shape[1]]
            x = scheduler.step(output, t, x, generator=generator).prev_sample
        if final_denoise is not None:
            t_batch = torch.full((x.shape[0],), final_denoise, device=x.device, dtype=torch.long)
            output = self.guided(model_fn, x, t_batch, guidance_scale, cfg_batch, self.learned_variance)
            x = self.predict_x0(x, t_batch, output[:, :x.shape[1]])
            if self.clip_sample is not None:
                x = x.clamp(-self.clip_sample, self.clip_sample)
        return x
