"""sampler.py against trusted references: diffusers' DDIMScheduler.step and torch.distributions.Normal."""

import os
import subprocess
import sys

import pytest
import torch
from diffusers import DDIMScheduler

import sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_scheduler(prediction_type="epsilon", num_steps=10, **overrides):
    scheduler = sampler.stable_diffusion_scheduler(prediction_type=prediction_type, **overrides)
    scheduler.set_timesteps(num_steps)
    return scheduler


def diffusers_mean_and_std(scheduler, model_output, t, sample, eta):
    """The Gaussian of diffusers' step: its sample with zero noise is the mean; sigma from _get_variance."""
    mean = scheduler.step(
        model_output, t, sample, eta=eta, variance_noise=torch.zeros_like(sample)
    ).prev_sample
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    std = eta * scheduler._get_variance(t, prev_t) ** 0.5
    return mean, std


@pytest.fixture(scope="module")
def pipe():
    return sampler.load_pipeline("tiny")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_step_matches_diffusers_for_every_timestep(prediction_type, eta):
    scheduler = make_scheduler(prediction_type)
    x = torch.randn(3, 4, 8, 8)
    for t in scheduler.timesteps:  # includes the last step, where alpha-bar_prev is final_alpha_cumprod
        eps = torch.randn_like(x)
        expected = scheduler.step(eps, t, x, eta=eta, generator=torch.Generator().manual_seed(1)).prev_sample
        ours, log_prob = sampler.ddim_step_with_logprob(
            scheduler, eps, t, x, eta, generator=torch.Generator().manual_seed(1)
        )
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        assert log_prob.shape == (3,) and log_prob.dtype == torch.float32 and torch.isfinite(log_prob).all()


def test_eta_zero_is_diffusers_deterministic_ddim():
    scheduler = make_scheduler()
    x = torch.randn(2, 4, 8, 8)
    for t in scheduler.timesteps:
        eps = torch.randn_like(x)
        ours, log_prob = sampler.ddim_step_with_logprob(scheduler, eps, t, x, eta=0.0)
        torch.testing.assert_close(ours, scheduler.step(eps, t, x, eta=0.0).prev_sample, rtol=1e-5, atol=1e-6)
        assert torch.equal(log_prob, torch.zeros(2))  # a deterministic step has no density to report
        x = ours


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_log_prob_equals_torch_normal(prediction_type):
    scheduler = make_scheduler(prediction_type)
    x, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = scheduler.timesteps[3]
    prev = torch.randn(4, 4, 8, 8)
    _, log_prob = sampler.ddim_step_with_logprob(scheduler, eps, t, x, eta=1.0, prev_sample=prev)
    mean, std = diffusers_mean_and_std(scheduler, eps, t, x, eta=1.0)
    expected = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-5)


def test_log_prob_is_float32_for_half_inputs():
    scheduler = make_scheduler()
    x, eps = torch.randn(2, 4, 8, 8).half(), torch.randn(2, 4, 8, 8).half()
    prev, log_prob = sampler.ddim_step_with_logprob(scheduler, eps, scheduler.timesteps[0], x)
    assert prev.dtype == torch.float16 and log_prob.dtype == torch.float32


def test_batched_timesteps_equal_one_call_per_sample():
    scheduler = make_scheduler("v_prediction")
    x, eps, prev = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = scheduler.timesteps[[0, 4, 9]]  # (B,), the last one is the final step
    _, batched = sampler.ddim_step_with_logprob(scheduler, eps, timesteps, x, prev_sample=prev)
    for i, t in enumerate(timesteps):
        _, single = sampler.ddim_step_with_logprob(
            scheduler, eps[i : i + 1], int(t), x[i : i + 1], prev_sample=prev[i : i + 1]
        )
        torch.testing.assert_close(batched[i : i + 1], single)


def test_zero_sigma_gives_no_inf_or_nan_and_finite_gradients():
    # set_alpha_to_one makes alpha-bar_prev = 1 at the last step, so sigma_t = 0 even with eta = 1.
    scheduler = make_scheduler(set_alpha_to_one=True)
    x = torch.randn(2, 4, 8, 8)
    eps = torch.randn(2, 4, 8, 8, requires_grad=True)
    t = scheduler.timesteps[-1]
    prev, log_prob = sampler.ddim_step_with_logprob(scheduler, eps, t, x, eta=1.0)
    assert torch.isfinite(prev).all() and torch.equal(log_prob, torch.zeros(2))
    _, log_prob = sampler.ddim_step_with_logprob(scheduler, eps, t, x, eta=1.0, prev_sample=prev + 0.1)
    log_prob.sum().backward()
    assert torch.isfinite(eps.grad).all()


def test_clip_sample_is_honoured():
    scheduler = make_scheduler(clip_sample=True, clip_sample_range=1.0)
    x, eps = 3 * torch.randn(2, 4, 8, 8), 3 * torch.randn(2, 4, 8, 8)
    t = scheduler.timesteps[2]
    expected = scheduler.step(eps, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(sampler.ddim_step_with_logprob(scheduler, eps, t, x, eta=0.0)[0], expected)


def test_sample_shapes_and_images(pipe):
    out = sampler.sample(
        pipe, ["a cat", "a dog", "a cat"], num_steps=6, generator=torch.Generator().manual_seed(0)
    )
    assert out["images"].shape == (3, 3, 32, 32)
    assert 0 <= out["images"].min() and out["images"].max() <= 1
    assert out["latents"].shape == (3, 7, 4, 8, 8)
    assert out["log_probs"].shape == (3, 6) and out["log_probs"].dtype == torch.float32
    assert out["timesteps"].shape == (6,)
    assert out["cond"]["prompt_embeds"].shape == out["cond"]["negative_prompt_embeds"].shape


def test_sample_uses_one_batched_unet_call_per_step(pipe):
    calls = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        sampler.sample(pipe, ["a", "b"], num_steps=5)
    finally:
        hook.remove()
    assert calls == [4] * 5  # conditional + unconditional halves of 2 prompts, one call per step


def test_guidance_combines_conditional_and_unconditional(pipe):
    cond = sampler.encode_prompts(pipe, ["a red cat"])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor(500)
    with torch.no_grad():
        eps_c = pipe.unet(x, t, encoder_hidden_states=cond["prompt_embeds"]).sample
        eps_u = pipe.unet(x, t, encoder_hidden_states=cond["negative_prompt_embeds"]).sample
        guided = sampler.predict_noise(pipe.unet, x, t, cond, guidance=7.0)
    torch.testing.assert_close(guided, eps_u + 7.0 * (eps_c - eps_u), rtol=1e-4, atol=1e-5)


def test_per_image_generators_make_images_independent_of_the_batch(pipe):
    pair = sampler.sample(
        pipe, ["a cat", "a dog"], num_steps=4, generator=[torch.Generator().manual_seed(s) for s in (7, 8)]
    )
    alone = sampler.sample(pipe, ["a cat"], num_steps=4, generator=[torch.Generator().manual_seed(7)])
    # equal up to batch-size-dependent float rounding; different noise would differ by O(1)
    torch.testing.assert_close(pair["latents"][:1], alone["latents"], rtol=1e-3, atol=1e-4)


def test_recomputed_log_probs_give_ratio_one_at_every_step(pipe):
    """The PPO invariant: before any update, exp(new - old) == 1 for every stored transition."""
    out = sampler.sample(
        pipe,
        ["a cat", "a dog", "a bird", "a fish"],
        num_steps=8,
        eta=1.0,
        generator=torch.Generator().manual_seed(3),
    )
    latents, log_probs = out["latents"], out["log_probs"]
    for j, t in enumerate(out["timesteps"]):
        for rows in (slice(0, 4), slice(1, 3)):  # the whole batch and a micro-batch of it
            with torch.no_grad():
                new = sampler.step_log_prob(
                    pipe.unet,
                    pipe.scheduler,
                    latents[rows, j],
                    latents[rows, j + 1],
                    t,
                    {name: value[rows] for name, value in out["cond"].items()},
                )
            ratio = torch.exp(new - log_probs[rows, j])
            torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)


def test_step_log_prob_has_gradients_wrt_unet(pipe):
    out = sampler.sample(pipe, ["a cat"], num_steps=4)
    pipe.unet.requires_grad_(True)
    try:
        t = out["timesteps"][1]
        log_prob = sampler.step_log_prob(
            pipe.unet,
            pipe.scheduler,
            out["latents"][:, 1],
            out["latents"][:, 2],
            t,
            out["cond"],
        )
        log_prob.sum().backward()
        grads = [p.grad for p in pipe.unet.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    finally:
        pipe.unet.zero_grad(set_to_none=True)
        pipe.unet.requires_grad_(False)


def test_progress_bar_when_asked(pipe, capsys):
    sampler.sample(pipe, ["a cat"], num_steps=3, progress=True)
    assert "sampling" in capsys.readouterr().err
    sampler.sample(pipe, ["a cat"], num_steps=3)
    assert "sampling" not in capsys.readouterr().err


def test_local_folder_round_trip_with_v_prediction(tmp_path):
    tiny = sampler.tiny_pipeline()
    tiny.scheduler = DDIMScheduler.from_config(tiny.scheduler.config, prediction_type="v_prediction")
    tiny.save_pretrained(tmp_path)
    loaded = sampler.load_pipeline(str(tmp_path))
    assert isinstance(loaded.scheduler, DDIMScheduler)
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    for a, b in zip(loaded.unet.parameters(), tiny.unet.parameters(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_replaces_the_unet(tmp_path):
    changed = sampler.tiny_pipeline().unet
    with torch.no_grad():
        next(changed.parameters()).add_(1.0)
    changed.save_pretrained(tmp_path / "unet")
    loaded = sampler.load_pipeline("tiny", checkpoint=str(tmp_path))
    assert torch.equal(next(loaded.unet.parameters()), next(changed.parameters()))
    with pytest.raises(FileNotFoundError, match="neither unet/ nor lora/"):
        sampler.load_pipeline("tiny", checkpoint=str(tmp_path / "nothing"))


def test_missing_model_says_what_to_pass():
    with pytest.raises(ValueError, match="'tiny'") as error:
        sampler.load_pipeline("/no/such/model")
    assert "/no/such/model" in str(error.value)


def test_import_and_sample_end_to_end_in_a_fresh_process():
    code = (
        "import sampler; p = sampler.load_pipeline('tiny'); "
        "print(tuple(sampler.sample(p, ['a cat'] * 2, num_steps=3)['images'].shape))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "(2, 3, 32, 32)" in result.stdout
