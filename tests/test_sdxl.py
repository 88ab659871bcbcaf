"""SDXL under the same Algorithm 1, on `tiny-xl` (random SDXL weights built in code): the sampler against
stock StableDiffusionXLPipeline, and train.py / evaluate.py end to end (full and LoRA, bf16, gradient
checkpointing, L_pre, checkpoints that stock diffusers loads, exact resume, 2 ranks)."""

import json
import os

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from test_train import SMALL, metrics, pretrain_folder, run, torchrun

import evaluate
import sampler
import train

XL = ["--model", "tiny-xl"]  # after test_train's SMALL flags: the last --model wins


def assert_resume_is_exact(tmp_path, flags: list[str], out: str, weights: str):
    """1 iteration + --resume latest + 1 more give the weights file of 2 iterations in one go (`out`)."""
    part = run(tmp_path, *flags, "--iterations", "1", name="part")
    train.main(train.parse_args([*SMALL, *flags, "--out", part, "--iterations", "2", "--resume", "latest"]))
    whole, resumed = (load_file(os.path.join(o, "final", weights)) for o in (out, part))
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)


@pytest.fixture(scope="module")
def pipe():
    return sampler.load_pipeline("tiny-xl")


def stock_latents(stock, prompts, num_steps, guidance, seed=0):
    """What a diffusers user gets: StableDiffusionXLPipeline.__call__, DDIM at eta 1; its final latents."""
    generator = torch.Generator().manual_seed(seed)
    return stock(prompts, num_inference_steps=num_steps, guidance_scale=guidance, eta=1.0,
                 generator=generator, output_type="latent").images  # fmt: skip


@pytest.mark.parametrize("guidance", [7.0, 1.0])
def test_samples_equal_stock_sdxl_pipeline_with_one_batched_unet_call_per_step(pipe, guidance):
    prompts = ["a cat", "a red dog on a hill"]
    calls = []
    hook = pipe.unet.register_forward_hook(
        lambda module, args, kwargs, output: calls.append(
            (args[0].shape[0], kwargs["added_cond_kwargs"]["text_embeds"].shape[0])
        ),
        with_kwargs=True,
    )
    try:
        ours = sampler.sample(pipe, prompts, num_steps=4, guidance=guidance, eta=1.0,
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
    finally:
        hook.remove()
    halves = 1 if guidance == 1.0 else 2
    assert calls == [(halves * 2, halves * 2)] * 4  # cond and uncond halves in one call, with SDXL's inputs
    expected = stock_latents(pipe, prompts, 4, guidance)
    assert torch.equal(ours["latents"][:, -1], expected)
    images = pipe(prompts, num_inference_steps=4, guidance_scale=guidance, eta=1.0,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images  # fmt: skip
    assert torch.equal(ours["images"], images)
    cond = ours["cond"]
    assert cond["prompt_embeds"].shape == (2, 16, 32 + 48) and cond["pooled_prompt_embeds"].shape == (2, 16)
    assert cond["add_time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2  # original size, crop, target size
    assert not cond["negative_prompt_embeds"].any()  # SDXL's empty negative prompt: zeros, as stock


def test_a_negative_prompt_is_encoded_as_stock_sdxl_does(pipe):
    ours = sampler.sample(pipe, ["a cat"], num_steps=3, generator=torch.Generator().manual_seed(1),
                          negative_prompt="blurry")  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    expected = pipe(["a cat"], negative_prompt="blurry", num_inference_steps=3, guidance_scale=7.0, eta=1.0,
                    generator=generator, output_type="latent").images  # fmt: skip
    assert torch.equal(ours["latents"][:, -1], expected)


def test_recomputed_log_probs_give_ratio_one(pipe):
    """Exactly 1 on the whole batch; within 1e-5 on a micro-batch (batch-size-dependent float rounding)."""
    out = sampler.sample(pipe, ["a cat", "a dog", "a bird"], num_steps=5,
                         generator=torch.Generator().manual_seed(3))  # fmt: skip
    for j, t in enumerate(out["timesteps"]):
        for rows, atol in [(slice(0, 3), 0.0), (slice(1, 3), 1e-5)]:
            cond = {name: value[rows] for name, value in out["cond"].items()}
            with torch.no_grad():
                new = sampler.step_log_prob(pipe.unet, pipe.scheduler, out["latents"][rows, j],
                                            out["latents"][rows, j + 1], t, cond)  # fmt: skip
            ratio = torch.exp(new - out["log_probs"][rows, j])
            torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=atol)


def test_pretrain_loss_takes_sdxl_conditioning_and_trains_the_unet(pipe):
    """L_pre passes SDXL's inputs: dropped captions get the zeros guidance uses as unconditional input, and
    the size ids each image's size before its resize."""
    arrays = [torch.rand(32, 32, 3).numpy() * 255 for _ in range(2)]
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda unet, args, kwargs: seen.append(kwargs), with_kwargs=True
    )
    pipe.unet.requires_grad_(True)
    try:
        captions = ["a red square", "a blue circle"]
        loss = sampler.pretrain_loss(pipe, pipe.unet, captions, arrays, 0, 0.0, [(512, 768), (64, 64)])
        loss.backward()
        assert torch.isfinite(loss) and loss > 0
        assert pipe.unet.add_embedding.linear_1.weight.grad.abs().sum() > 0  # the pooled text / size ids path
        with torch.no_grad():
            sampler.pretrain_loss(pipe, pipe.unet, captions, arrays, 0, uncond_prob=1.0)
    finally:
        hook.remove()
        pipe.unet.zero_grad(set_to_none=True)
        pipe.unet.requires_grad_(False)
    (kept, kept_added), (dropped, dropped_added) = [
        (k["encoder_hidden_states"], k["added_cond_kwargs"]) for k in seen
    ]
    assert kept_added["time_ids"].tolist() == [[512, 768, 0, 0, 32, 32], [64, 64, 0, 0, 32, 32]]
    assert kept.any() and kept_added["text_embeds"].any()
    assert not dropped.any() and not dropped_added["text_embeds"].any()


def test_only_a_text_to_image_sdxl_loads_and_fp16_is_refused_before_the_weights(tmp_path, monkeypatch):
    folder = tmp_path / "tiny-xl"
    sampler.tiny_xl_pipeline().save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    # SDXL's VAE overflows in fp16 (NaN images, nonsense rewards): one line naming bf16, no weights loaded
    monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ValueError, match="overflows in fp16.*bf16"):
        flags = ["--rewards", "brightness", "--mixed-precision", "fp16", "--out", str(tmp_path / "run")]
        train.setup(train.parse_args([*SMALL, "--model", str(folder), *flags]))
    for model in (str(folder), "tiny-xl"):  # evaluate.py --mixed-precision fp16
        with pytest.raises(ValueError, match="overflows in fp16.*bf16"):
            sampler.load_pipeline(model, dtype=torch.float16)
    refiner = {**index, "_class_name": "StableDiffusionXLImg2ImgPipeline"}
    (folder / "model_index.json").write_text(json.dumps(refiner))
    with pytest.raises(ValueError, match="StableDiffusionXLImg2ImgPipeline.*not a refiner"):
        sampler.load_pipeline(str(folder))


def test_brightness_rises_on_policy_at_the_first_trained_step(tmp_path):
    flags = ["--rewards", "brightness", "--iterations", "24", "--batch-size", "16", "--lr", "3e-3"]
    out = run(tmp_path, *XL, *flags)  # tiny-xl's images barely move: a larger step than tiny's 1e-3
    rows = metrics(out)
    for row in rows:
        assert row["ratio_error_first"] == 0 and row["clipfrac_per_step"][0] == 0
        assert row["approx_kl_per_step"][0] < 1e-10
    means = torch.tensor([row["reward_mean"] for row in rows])
    noise = (means[1:] - means[:-1])[:6].abs().mean()  # iteration-to-iteration noise early in training
    gain = means[-4:].mean() - means[:4].mean()
    assert gain > 5 * noise, (gain, noise, means)


def test_full_checkpoint_loads_in_stock_sdxl_resumes_exactly_and_evaluates(tmp_path):
    folder = str(tmp_path / "tiny-xl")
    base = sampler.tiny_xl_pipeline()
    base.scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config)  # as the hub's SDXL base ships
    base.save_pretrained(folder)  # the base model as a diffusers folder, as a hub copy
    flags = ["--model", folder, "--rewards", "brightness", "--save-every", "1", "--gradient-checkpointing",
             "--pretrain-data", str(pretrain_folder(tmp_path))]  # fmt: skip
    out = run(tmp_path, *flags, "--iterations", "2")
    assert [row["task"] for row in metrics(out)] == ["brightness", "pretrain"] * 2
    unet = UNet2DConditionModel.from_pretrained(os.path.join(out, "final", "unet"))  # as a diffusers user
    stock = StableDiffusionXLPipeline.from_pretrained(folder, unet=unet)
    stock.scheduler = DDIMScheduler.from_config(stock.scheduler.config)  # as load_pipeline does
    ours = sampler.load_pipeline(folder, checkpoint=os.path.join(out, "final"))
    assert isinstance(ours, StableDiffusionXLPipeline)
    seed = torch.Generator().manual_seed(0)
    latents = sampler.sample(ours, ["a cat"], num_steps=3, generator=seed)["latents"]
    assert torch.equal(latents[:, -1], stock_latents(stock, ["a cat"], 3, 7.0))
    base = sampler.sample(sampler.load_pipeline(folder), ["a cat"], num_steps=3,
                          generator=torch.Generator().manual_seed(0))["latents"]  # fmt: skip
    assert (latents - base).abs().max() > 1e-3  # trained, and the checkpoint is what loaded
    assert_resume_is_exact(tmp_path, flags, out, os.path.join("unet", "diffusion_pytorch_model.safetensors"))
    # evaluate.py scores base and checkpoint on SDXL
    results = str(tmp_path / "evaluate")
    evaluate.main(["--model", folder, "--checkpoint", f"tuned={os.path.join(out, 'final')}", "--suites",
                   "brightness", "--num-steps", "2", "--max-prompts", "2", "--images-per-prompt", "2",
                   "--batch-size", "4", "--resamples", "100", "--out", results])  # fmt: skip
    scores = json.load(open(os.path.join(results, "results.json")))["sets"]["brightness/test"]
    assert {"base", "tuned"} <= set(scores["files"])


def test_lora_in_bf16_loads_in_stock_sdxl_and_resumes_exactly(tmp_path):
    pytest.importorskip("peft")
    folder = str(tmp_path / "tiny-xl")
    sampler.tiny_xl_pipeline().save_pretrained(folder)
    flags = ["--model", folder, "--rewards", "brightness", "--lora-rank", "4", "--lr", "1e-2", "--clip-range",
             "0.5", "--mixed-precision", "bf16", "--save-every", "1"]  # fmt: skip
    out = run(tmp_path, *flags, "--iterations", "2")
    for row in metrics(out):  # on policy at the first trained step under bf16 too
        assert row["skipped_steps"] == 0 and row["ratio_error_first"] == 0
    stock = StableDiffusionXLPipeline.from_pretrained(folder)
    stock.set_progress_bar_config(disable=True)
    base = stock_latents(stock, ["a cat", "a dog"], 3, 7.0)
    stock.load_lora_weights(os.path.join(out, "final", "lora"))  # what a diffusers user does
    tuned = stock_latents(stock, ["a cat", "a dog"], 3, 7.0)
    assert (tuned - base).abs().max() > 1e-3  # loaded, not a silent no-op
    ours = sampler.load_pipeline(folder, checkpoint=os.path.join(out, "final"))
    seed = torch.Generator().manual_seed(0)
    assert torch.equal(sampler.sample(ours, ["a cat", "a dog"], 3, generator=seed)["latents"][:, -1], tuned)
    assert_resume_is_exact(tmp_path, flags, out, os.path.join("lora", "pytorch_lora_weights.safetensors"))


def test_torchrun_two_ranks_train_sdxl_with_identical_weights(tmp_path):
    out = str(tmp_path / "ddp")
    torchrun(*SMALL, *XL, "--rewards", "brightness", "--iterations", "2", "--out", out, "--save-every", "1")
    rows = metrics(out)
    assert [row["iteration"] for row in rows] == [0, 1] and all(row["samples"] == 8 for row in rows)
    state = torch.load(os.path.join(out, "checkpoint-2", "train_state.pt"), weights_only=True)
    checksums = state["rank_checksums"]
    assert checksums.shape == (2, 2) and torch.equal(checksums[0], checksums[1])
