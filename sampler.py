"""Stochastic DDIM sampling that records each step's Gaussian log-prob (paper section 1).

Denoising is a T-step MDP: state (c, t, x_t), action x_{t-1}, policy
pi(x_{t-1} | x_t, c) = N(mu_theta(x_t, t, c), sigma_t^2 I). With eta > 0 every DDIM step is such a
Gaussian, so the log-prob of an action is tractable and the policy gradient applies.

python -c "import sampler; print(sampler.sample(sampler.load_pipeline('tiny'), ['a cat'])['images'].shape)"

Names in the code -> symbols of DDIM (Song et al. 2021, eqs. 12 and 16):
    alpha_prod_t       alpha-bar_t         (cumulative product of the noise schedule)
    alpha_prod_t_prev  alpha-bar_{t-1}     (at the previous DDIM step, not t - 1)
    pred_original      x_0-hat             predicted clean latents
    pred_epsilon       epsilon-hat         predicted noise
    std_dev_t          sigma_t             eta * sqrt((1 - a_{t-1}) / (1 - a_t)) * sqrt(1 - a_t / a_{t-1})
"""

import json
import math
import os
import warnings

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TOY_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "toy-model")
PAPER_MODEL = "stabilityai/stable-diffusion-2-base"  # the default --model of train.py and evaluate.py
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISIONS = ["auto", *DTYPES]  # --mixed-precision of train.py, evaluate.py and tools/bench.py
STEP_WEIGHTS = ["none", "sensitivity"]  # --timestep-weight of train.py (step_weights)


def precision_dtype(mixed_precision: str, device) -> torch.dtype:
    """--mixed-precision as a dtype; auto: bf16 on a CUDA device that supports it (the paper's), else fp32."""
    if mixed_precision != "auto":
        return DTYPES[mixed_precision]
    cuda = torch.device(device).type == "cuda"  # native bf16 (Ampere on), not the emulation on a V100 or T4
    return (
        torch.bfloat16 if cuda and torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    )


#### The DDIM step with its log-prob ####


def _per_sample(values: torch.Tensor, timestep: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[timestep] shaped (B, 1, 1, ...) so that it broadcasts against a (B, C, H, W) sample."""
    out = values.to(timestep.device)[timestep.clamp(min=0)]
    return out.reshape(-1, *([1] * (ndim - 1)))


def ddim_step_mean(
    scheduler: DDIMScheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy of one DDIM step x_t -> x_{t-1}: N(mu, sigma_t^2 I). Returns mu (B, ...) and sigma_t
    (B, 1, ...), float32. scheduler: a DDIMScheduler after `set_timesteps`; timestep: int, 0-d or (B,)."""
    config = scheduler.config
    model_output, sample = model_output.float(), sample.float()
    timestep = torch.as_tensor(timestep, device=sample.device).long().reshape(-1)  # (B,) or (1,)
    prev_timestep = timestep - config.num_train_timesteps // scheduler.num_inference_steps

    alphas_cumprod = scheduler.alphas_cumprod.float()
    alpha_prod_t = _per_sample(alphas_cumprod, timestep, sample.ndim)
    alpha_prod_t_prev = torch.where(
        prev_timestep >= 0,
        alphas_cumprod.to(sample.device)[prev_timestep.clamp(min=0)],
        torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32, device=sample.device),
    ).reshape(alpha_prod_t.shape)
    beta_prod_t = 1 - alpha_prod_t

    # x_0-hat and epsilon-hat from the network's output
    if config.prediction_type == "epsilon":
        pred_original = (sample - beta_prod_t.sqrt() * model_output) / alpha_prod_t.sqrt()
        pred_epsilon = model_output
    elif config.prediction_type == "v_prediction":
        pred_original = alpha_prod_t.sqrt() * sample - beta_prod_t.sqrt() * model_output
        pred_epsilon = alpha_prod_t.sqrt() * model_output + beta_prod_t.sqrt() * sample
    else:
        raise ValueError(
            f"prediction_type {config.prediction_type!r} is not supported; use epsilon or v_prediction"
        )
    if config.thresholding:
        raise ValueError(
            "dynamic thresholding is not supported; build the DDIMScheduler with thresholding=False"
        )
    if config.clip_sample:
        pred_original = pred_original.clamp(-config.clip_sample_range, config.clip_sample_range)

    # Eq. 16: sigma_t = eta * sqrt((1 - a_{t-1}) / (1 - a_t) * (1 - a_t / a_{t-1}))
    variance = (1 - alpha_prod_t_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance.clamp(min=0).sqrt()

    # Eq. 12: mu = sqrt(a_{t-1}) x_0-hat + sqrt(1 - a_{t-1} - sigma_t^2) epsilon-hat
    direction = (1 - alpha_prod_t_prev - std_dev_t**2).clamp(min=0).sqrt() * pred_epsilon
    return alpha_prod_t_prev.sqrt() * pred_original + direction, std_dev_t


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2 I) averaged over the non-batch dimensions, (B,) float32, as the authors' code
    does (a sum over 4x64x64 dims would overflow exp(new - old)). A step with std = 0 (eta = 0) is
    deterministic: it has no density, carries no policy gradient, and its log_prob is reported as 0."""
    stochastic = std > 0
    safe_std = torch.where(stochastic, std, torch.ones_like(std))
    log_prob = (
        -((x.detach().float() - mean) ** 2) / (2 * safe_std**2)
        - torch.log(safe_std)
        - 0.5 * math.log(2 * math.pi)
    )
    log_prob = torch.where(stochastic, log_prob, torch.zeros_like(log_prob))
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))  # (B,)


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2 I) || N(ref_mean, std^2 I)) = ||mean - ref_mean||^2 / (2 std^2), averaged over the
    non-batch dimensions as gaussian_log_prob: (B,) float32, 0 where std = 0."""
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    kl = torch.where(std > 0, (mean - ref_mean.float()) ** 2 / (2 * safe_std**2), torch.zeros_like(mean))
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t-1} and the log-density of x_{t-1} under N(mu, sigma_t^2 I).

    scheduler: a DDIMScheduler after `set_timesteps`. timestep: int, 0-d or (B,) tensor.
    prev_sample: when given, the action whose log-prob is wanted (training); when None it is drawn.
    Returns prev_sample in `sample`'s dtype and log_prob (B,) in float32 (gaussian_log_prob).
    """
    mean, std_dev_t = ddim_step_mean(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        prev_sample = mean + std_dev_t * noise
    return prev_sample.to(sample.dtype), gaussian_log_prob(prev_sample, mean, std_dev_t)


#### Which DDIM steps train.py trains, and their weights ####


def timestep_window(spec: str, num_steps: int, train_timesteps: int = 1) -> range:
    """The DDIM step indices j of --timestep-window LO:HI: LO <= j < HI in sampling order (0: the first,
    noisiest step); an end left out is 0 or num_steps, so ':' is every step (the paper's Algorithm 1). A spec
    that is not LO:HI, an empty window, one outside 0:num_steps, or one with fewer than train_timesteps
    steps is a ValueError whose one line names the flag and the valid range."""
    lo, colon, hi = spec.partition(":")
    try:
        window = range(int(lo or 0), int(hi or num_steps)) if colon else range(0)
    except ValueError:
        window = range(0)
    if not window or window.start < 0 or window.stop > num_steps:
        raise ValueError(f"--timestep-window {spec!r} must be LO:HI with 0 <= LO < HI <= {num_steps} "
                         f"(--num-steps); ':' or 0:{num_steps} trains every step")  # fmt: skip
    if train_timesteps > len(window):
        raise ValueError(f"--train-timesteps ({train_timesteps}) must be between 1 and {len(window)}, the "
                         f"DDIM steps of --timestep-window {window.start}:{window.stop} of --num-steps "
                         f"{num_steps}")  # fmt: skip
    return window


def step_weights(
    scheduler: DDIMScheduler, timesteps: torch.Tensor, eta: float = 1.0, weighting: str = "none"
) -> torch.Tensor:
    """c_t of --timestep-weight for each of the T DDIM steps, (T,) float32. The clipped surrogate takes the
    policy ratio of step t as w~_t = exp(c_t log w_t) = w_t^c_t:
        none          c_t = 1                                            the paper's ratio, bit for bit
        sensitivity   c_t = (sigma_t / |k_t|) / mean_s (sigma_s / |k_s|)   mean over the T steps: c averages 1
    sigma_t of Eq. 16, and k_t = d mu / d(UNet output), the weight of the network's prediction in the step's
    mean (Eq. 12, linear in it for epsilon- and v-prediction).
    Why: an update changes the output by some e, hence the mean by k_t e; for an action x = mu_old +
    sigma_t z the log-ratio is then log w_t = mean(k_t e z) / sigma_t - mean((k_t e)^2) / (2 sigma_t^2), so
    step t's ratio, its clipping and its gradient A c_t grad log p (at w = 1) answer the same change of the
    output |k_t| / sigma_t times as strongly. With SD's schedule at T = 10 that factor is 0.97-1.32 at every
    step but step 8 (t = 101 -> 1: a long jump with little noise), where it is 8.3: the step whose clipfrac
    is ~1 and whose gradient norm is 7-26 against < 0.4 elsewhere. Step 9 has the smallest sigma_t but a
    factor of 1.0, which is why c_t is not sigma_t alone (that would all but stop training step 9). With
    these c_t, log w~_t ~ sign(k_t) mean(e z) / mean_s(sigma_s / |k_s|): every step answers alike."""
    if weighting == "none":
        return torch.ones(len(timesteps))
    zeros, ones = torch.zeros(len(timesteps), 1), torch.ones(len(timesteps), 1)  # (T, 1): one "pixel" a step
    mean_at_zero, sigma = ddim_step_mean(scheduler, zeros, timesteps, zeros, eta)
    k = ddim_step_mean(scheduler, ones, timesteps, zeros, eta)[0] - mean_at_zero  # mu is linear in the output
    inverse_sensitivity = (sigma / k.abs()).flatten()  # sigma_t / |k_t|
    return inverse_sensitivity / inverse_sensitivity.mean()


#### Loading a pipeline ####


def _tiny_tokenizer(max_length: int = 16, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer (no merges) built in code: the byte alphabet, each
    byte also as an end-of-word token, and the three special tokens."""
    alphabet = [chr(c) for c in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in alphabet + [a + "</w>" for a in alphabet]:
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length, pad_token=pad_token)


def _tiny_text_config(tokenizer: CLIPTokenizer, width: int = 32, projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def _tiny_unet(cross_attention_dim: int = 32, **sdxl) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
        **sdxl,
    )


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8,
        sample_size=32,
    )


def tiny_pipeline() -> StableDiffusionPipeline:
    """Stable Diffusion's components with random weights, built in code (no download): 32x32
    images, 4x8x8 latents. The same seed gives the same weights on every rank."""
    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer()
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
    unet = _tiny_unet()
    return assemble_pipeline(_tiny_vae(), text_encoder, tokenizer, unet)


def tiny_xl_pipeline() -> StableDiffusionXLPipeline:
    """SDXL's components with random weights, built in code as tiny_pipeline (32x32 images), laid out as
    stabilityai/stable-diffusion-xl-base-1.0's: two text encoders of different widths whose penultimate
    hidden states are concatenated (32 + 48 = cross_attention_dim 80), the second's pooled projection (16)
    and its tokenizer padding with "!", and a UNet with SDXL's added "text_time" embedding of the pooled
    text and the 6 size / crop ids (6 * 8 + 16 = 64 inputs)."""
    torch.manual_seed(0)
    tokenizer, tokenizer_2 = _tiny_tokenizer(), _tiny_tokenizer(pad_token="!")
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(tokenizer_2, width=48, projection_dim=16))
    unet = _tiny_unet(cross_attention_dim=32 + 48, addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=6 * 8 + 16)  # fmt: skip
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=stable_diffusion_scheduler(),
        add_watermarker=False,
    )


def stable_diffusion_scheduler(**overrides) -> DDIMScheduler:
    """DDIM with Stable Diffusion's noise schedule and settings (scaled_linear betas 0.00085 .. 0.012)."""
    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    return DDIMScheduler(**{**config, **overrides})


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler=None) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline from components built in code (no safety checker)."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler or stable_diffusion_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


BUILT_IN = {"tiny": tiny_pipeline, "tiny-xl": tiny_xl_pipeline}  # --model names built in code


def check_model(model: str) -> None:
    """Refuse in seconds a --model that cannot load: not 'toy' or built in, not a local folder, not in this
    machine's hub cache, and the hub cannot be reached or has no such repository."""
    if model == "toy" or model in BUILT_IN or os.path.isdir(model):
        return
    if os.path.isabs(model) or model.startswith(".") or model.count("/") > 1:  # a path, not a hub id
        raise FileNotFoundError(
            f"could not load --model {model}: no such folder; pass a diffusers folder (with model_index.json)"
            f", a hub id such as {PAPER_MODEL}, 'toy', 'tiny' or 'tiny-xl'"
        )
    import huggingface_hub

    try:
        if isinstance(huggingface_hub.try_to_load_from_cache(model, "model_index.json"), str):
            return  # cached: from_pretrained loads it without network
        huggingface_hub.model_info(model, timeout=10)
    except Exception as error:  # offline, no network, no such repository, not a repository id
        raise OSError(
            f"could not load --model {model}: it is not a local folder, not in this machine's hub cache, and "
            f"the Hugging Face hub says: {str(error).rstrip('.')}. `--model toy` runs offline (the toy "
            "world, on a CPU); for SD2, give this machine network access once, or HF_HOME with a cache of it"
        ) from error


def load_pipeline(
    model: str, device="cpu", dtype: torch.dtype = torch.float32, checkpoint: str | None = None
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A Stable Diffusion 1.x / 2.x or SDXL pipeline with a DDIMScheduler built from its own scheduler config.

    model: "tiny" / "tiny-xl" (random weights, built in code), "toy" (the toy world's pretrained model in
    data/toy-model), a local diffusers folder, or a Hugging Face id such as
    "stabilityai/stable-diffusion-2-base" or "stabilityai/stable-diffusion-xl-base-1.0" (its
    model_index.json says which family it is). checkpoint: a folder written by train.py whose UNet (or
    LoRA adapter) replaces the base model's. Every module is frozen and in eval mode.
    """
    check_precision(model, dtype)
    if model in BUILT_IN:
        pipe = BUILT_IN[model]()
    else:
        path = TOY_MODEL_DIR if model == "toy" else model
        if model == "toy" and not os.path.isfile(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(
                f"the toy model is missing from {path}; run `python toyworld.py pretrain`"
            )
        family = pipeline_class(model)
        try:
            if family is StableDiffusionXLPipeline:
                pipe = StableDiffusionXLPipeline.from_pretrained(path, dtype=dtype, add_watermarker=False)
            else:
                pipe = StableDiffusionPipeline.from_pretrained(
                    path, dtype=dtype, safety_checker=None, requires_safety_checker=False
                )
        except (OSError, ValueError) as error:
            raise ValueError(unloadable(model, error)) from error
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if checkpoint is not None:
        load_checkpoint_weights(pipe, checkpoint)
    if is_sdxl(pipe):  # 1024x1024 images: the VAE decodes a batch one image at a time
        pipe.vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():  # UNet, VAE, the text encoder(s)
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            module.eval()
    return pipe.to(device) if pipe.unet.dtype == dtype else pipe.to(device, dtype)


def is_sdxl(pipe) -> bool:
    """SDXL conditions its UNet on two text encoders, their pooled text embedding and size / crop ids."""
    return isinstance(pipe, StableDiffusionXLPipeline)


def text_encoders(pipe) -> list:
    """The pipeline's frozen text encoder(s): SDXL has two."""
    return [pipe.text_encoder, pipe.text_encoder_2] if is_sdxl(pipe) else [pipe.text_encoder]


def unloadable(model: str, error: Exception) -> str:
    """The one line for a --model that does not load."""
    return (f"could not load a Stable Diffusion pipeline from {model!r}: it is not a local folder with a "
            f"model_index.json and loading it as a Hugging Face id failed ({error}). Pass a diffusers "
            f"folder, a hub id such as {PAPER_MODEL!r} (needs network or a cached copy), 'toy', 'tiny' or "
            "'tiny-xl'.")  # fmt: skip


def pipeline_class(model: str) -> type:
    """StableDiffusionPipeline (SD 1.x / 2.x, the toy model) or StableDiffusionXLPipeline (SDXL base), from
    --model's model_index.json alone: no weights load. Another SDXL pipeline (the refiner, inpainting,
    image-to-image) cannot be trained here and is refused."""
    if model in BUILT_IN or model == "toy":
        return StableDiffusionXLPipeline if model == "tiny-xl" else StableDiffusionPipeline
    try:
        name = DiffusionPipeline.load_config(model)["_class_name"]
    except (OSError, ValueError) as error:
        raise ValueError(unloadable(model, error)) from error
    if not name.startswith("StableDiffusionXL"):
        return StableDiffusionPipeline
    if name != "StableDiffusionXLPipeline":
        raise ValueError(f"--model {model} is a {name}; RL here trains a text-to-image model: SD 1.x / 2.x "
                         "or SDXL base (a StableDiffusionXLPipeline), not a refiner, inpainting or "
                         "image-to-image pipeline")  # fmt: skip
    return StableDiffusionXLPipeline


def check_precision(model: str, dtype: torch.dtype) -> None:
    """Refuse, before any weights load, fp16 with SDXL's VAE, which overflows in it (force_upcast in its
    config): every image would be NaN. A VAE made for fp16 sets force_upcast false."""
    if dtype != torch.float16 or pipeline_class(model) is not StableDiffusionXLPipeline:
        return
    vae = {} if model in BUILT_IN else AutoencoderKL.load_config(model, subfolder="vae")
    if vae.get("force_upcast", True):  # AutoencoderKL's default, and SDXL base's
        raise ValueError("SDXL's VAE overflows in fp16 (force_upcast in its config): pass --mixed-precision "
                         "bf16 or no, or a model whose VAE is made for fp16")  # fmt: skip


def load_checkpoint_weights(pipe, checkpoint: str, ema: bool = False) -> None:
    """Replace the pipeline's UNet weights by a train.py checkpoint's: `unet/` (full fine-tune, diffusers
    layout) or `lora/` (a LoRA adapter, added to the UNet unless it has one); with ema, their --ema-decay
    average `unet_ema/` or `lora_ema/`. `checkpoint` may also be one of these folders itself."""
    suffix = "_ema" if ema else ""
    unet_dir, lora_dir = os.path.join(checkpoint, "unet" + suffix), os.path.join(checkpoint, "lora" + suffix)
    if os.path.isfile(os.path.join(checkpoint, "adapter_config.json")):
        lora_dir = checkpoint
    elif os.path.isfile(os.path.join(checkpoint, "config.json")):
        unet_dir = checkpoint
    if os.path.isdir(unet_dir):
        unet = UNet2DConditionModel.from_pretrained(unet_dir)
        check_finite(unet.state_dict(), unet_dir)
        pipe.unet.load_state_dict(unet.state_dict())
    elif os.path.isdir(lora_dir):
        from peft import LoraConfig

        if not getattr(pipe.unet, "peft_config", None):
            pipe.unet.add_adapter(LoraConfig.from_pretrained(lora_dir))
        load_lora_weights(pipe.unet, lora_dir)
    else:
        raise FileNotFoundError(
            f"{checkpoint} holds neither unet{suffix}/ nor lora{suffix}/; pass a folder written by train.py"
        )


def check_finite(state_dict: dict, source: str):
    """Refuse weights with NaN or inf (a damaged file): they would load silently and score nonsense."""
    bad = [
        name
        for name, weight in state_dict.items()
        if weight.is_floating_point() and not weight.isfinite().all()
    ]
    if bad:
        raise ValueError(f"{source} holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]}): the file "
                         "is damaged; use another checkpoint")  # fmt: skip


def load_lora_weights(unet, folder: str) -> None:
    """Load a train.py LoRA folder into a UNet that already carries its adapter: the weights in diffusers'
    layout (pytorch_lora_weights.safetensors, what stock pipe.load_lora_weights reads too), or in peft's
    (adapter_model.safetensors), as checkpoints written before 2026-12 hold them."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = os.path.join(folder, "pytorch_lora_weights.safetensors")
    if os.path.isfile(path):
        state_dict = {key.removeprefix("unet."): value for key, value in load_file(path).items()}
        state_dict = convert_unet_state_dict_to_peft(state_dict)
    else:
        path = os.path.join(folder, "adapter_model.safetensors")
        state_dict = load_file(path)
    check_finite(state_dict, path)
    result = set_peft_model_state_dict(unet, state_dict)
    if result.unexpected_keys:
        raise ValueError(f"{folder} does not match the UNet's LoRA adapter: {result.unexpected_keys[:3]} ...")


#### Prompts, guidance, sampling ####


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], negative_prompt: str = "") -> dict[str, torch.Tensor]:
    """The UNet's conditioning `cond` of the prompts and of the negative prompt, every tensor batch-first
    (B, ...), under the names of diffusers' pipelines:
        prompt_embeds, negative_prompt_embeds         (B, L, D)  the text encoder's last hidden states
    SDXL (is_sdxl) has two text encoders and two more inputs:
        prompt_embeds, negative_prompt_embeds         (B, L, D1 + D2)  both encoders' penultimate states
        pooled_prompt_embeds, negative_pooled_...     (B, P)  text_encoder_2's pooled, projected output
        add_time_ids                                  (B, 6)  original size, crop top-left, target size
    As stock StableDiffusionXLPipeline without a negative prompt, SDXL's empty negative prompt is all zeros
    (force_zeros_for_empty_prompt)."""

    def encode(texts: list[str], tokenizer, text_encoder):
        ids = tokenizer(
            texts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return text_encoder(ids.to(text_encoder.device), output_hidden_states=True)

    if not is_sdxl(pipe):  # SD 1.x / 2.x: one text encoder's last hidden states

        def embed(texts: list[str]) -> torch.Tensor:
            return encode(texts, pipe.tokenizer, pipe.text_encoder).last_hidden_state

        prompt_embeds, negative_prompt_embeds = embed(list(prompts)), embed([negative_prompt])
        return {"prompt_embeds": prompt_embeds,
                "negative_prompt_embeds": negative_prompt_embeds.expand_as(prompt_embeds)}  # fmt: skip

    # SDXL: both encoders' penultimate hidden states side by side, and the second's pooled projection
    def encode_xl(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        first = encode(texts, pipe.tokenizer, pipe.text_encoder)
        second = encode(texts, pipe.tokenizer_2, pipe.text_encoder_2)
        return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second.text_embeds

    prompt_embeds, pooled = encode_xl(list(prompts))
    if negative_prompt == "" and pipe.config.force_zeros_for_empty_prompt:
        negative_prompt_embeds, negative_pooled = torch.zeros_like(prompt_embeds), torch.zeros_like(pooled)
    else:
        negative_prompt_embeds, negative_pooled = (x.expand(len(prompts), *x.shape[1:])
                                                   for x in encode_xl([negative_prompt]))  # fmt: skip
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor  # the image side we sample at
    add_time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=pooled.device, dtype=pooled.dtype)
    return {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds,
            "pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled,
            "add_time_ids": add_time_ids.expand(len(prompts), 6)}  # fmt: skip


def unet_conditioning(cond: dict[str, torch.Tensor], guidance: float, dtype: torch.dtype) -> dict:
    """The UNet's keyword arguments for the batch [unconditional; conditional] of classifier-free guidance
    (the conditional half alone at w = 1), from encode_prompts' `cond`. SD passes the text embeddings;
    SDXL adds its added_cond_kwargs, pooled text embedding and size / crop ids, for each half likewise."""

    def halves(negative: str, positive: str) -> torch.Tensor:
        both = cond[positive] if guidance == 1.0 else torch.cat([cond[negative], cond[positive]])
        return both.to(dtype)

    kwargs = {"encoder_hidden_states": halves("negative_prompt_embeds", "prompt_embeds")}
    if "add_time_ids" in cond:  # SDXL
        kwargs["added_cond_kwargs"] = {
            "text_embeds": halves("negative_pooled_prompt_embeds", "pooled_prompt_embeds"),
            "time_ids": halves("add_time_ids", "add_time_ids"),
        }
    return kwargs


def predict_noise(unet, latents, timestep, cond: dict[str, torch.Tensor], guidance: float):
    """Classifier-free guidance with ONE batched UNet call for the unconditional and conditional halves:
    eps = eps_uncond + w * (eps_cond - eps_uncond). Returns float32 (B, C, h, w)."""
    dtype = next(unet.parameters()).dtype  # works for a bare, DDP- or peft-wrapped UNet
    x = latents.to(dtype)
    if guidance == 1.0:  # w = 1 is the plain conditional model: one half suffices
        return unet(x, timestep, **unet_conditioning(cond, guidance, dtype)).sample.float()
    timestep = torch.as_tensor(timestep, device=x.device)
    timestep = timestep.repeat(2) if timestep.ndim == 1 else timestep
    eps_uncond, eps_cond = (
        unet(torch.cat([x, x]), timestep, **unet_conditioning(cond, guidance, dtype)).sample.float().chunk(2)
    )
    return eps_uncond + guidance * (eps_cond - eps_uncond)


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode to images (B, 3, H, W) in [0, 1], float32."""
    vae = pipe.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def sample(
    pipe,
    prompts: list[str],
    num_steps: int = 50,
    guidance: float = 7.0,
    eta: float = 1.0,
    generator=None,
    negative_prompt: str = "",
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Run the whole denoising chain and keep the trajectory.

    generator: None, one torch.Generator, or a list of B generators (image i then depends only on
    generator i: paired base / fine-tuned images share their noise). Returns
        images     (B, 3, H, W)   in [0, 1]
        latents    (B, T+1, C, h, w)  x_T ... x_0, float32
        log_probs  (B, T)         log pi(x_{t-1} | x_t, c) of each action, float32
        timesteps  (T,)
        cond       the UNet's conditioning of each sample (encode_prompts): what training needs to
                   recompute the same step, SD's or SDXL's
    """
    if len(prompts) == 0:
        raise ValueError("sample() needs at least one prompt")
    unet, scheduler = pipe.unet, pipe.scheduler
    device = unet.device
    cond = encode_prompts(pipe, prompts, negative_prompt)
    scheduler.set_timesteps(num_steps, device=device)
    timesteps = scheduler.timesteps  # (T,)

    size = unet.config.sample_size
    shape = (len(prompts), unet.config.in_channels, size, size)
    latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    latents = latents * scheduler.init_noise_sigma
    all_latents, all_log_probs = [latents], []
    for t in tqdm(timesteps, desc="sampling", disable=not progress, leave=False):
        noise_pred = predict_noise(unet, latents, t, cond, guidance)
        latents, log_prob = ddim_step_with_logprob(
            scheduler, noise_pred, t, latents, eta, generator=generator
        )
        all_latents.append(latents)
        all_log_probs.append(log_prob)

    return {
        "images": decode(pipe, latents),
        "latents": torch.stack(all_latents, dim=1),  # (B, T+1, C, h, w)
        "log_probs": torch.stack(all_log_probs, dim=1),  # (B, T)
        "timesteps": timesteps,  # (T,)
        "cond": cond,  # {name: (B, ...)}
    }


def step_mean(
    unet,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    timestep,
    cond: dict[str, torch.Tensor],
    guidance: float = 7.0,
    eta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """mu_theta(x_t, c) and sigma_t of the policy's step at stored states under the CURRENT UNet (which may
    be wrapped in DDP or peft), with gradients and classifier-free guidance recomputed. The scheduler must
    hold the timesteps the trajectory was sampled with (set_timesteps); cond: the trajectory's rows."""
    noise_pred = predict_noise(unet, latents, timestep, cond, guidance)
    return ddim_step_mean(scheduler, noise_pred, timestep, latents, eta)


def step_log_prob(
    unet,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    next_latents: torch.Tensor,
    timestep,
    cond: dict[str, torch.Tensor],
    guidance: float = 7.0,
    eta: float = 1.0,
) -> torch.Tensor:
    """log pi_theta(x_{t-1} | x_t, c) of stored transitions under the current UNet (step_mean): the PPO
    ratio's numerator. Returns (B,)."""
    mean, std = step_mean(unet, scheduler, latents, timestep, cond, guidance, eta)
    return gaussian_log_prob(next_latents, mean, std)


#### L_pre of Algorithm 1: image-caption data and the denoising loss ####


def load_pretrain_data(folder: str) -> list[tuple[str, str]]:
    """(image path, caption) pairs from folder/metadata.jsonl lines {"file_name": ..., "text": ...}."""
    index = os.path.join(folder, "metadata.jsonl")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"--pretrain-data {folder} has no metadata.jsonl; see the README's 'L_pre'")
    with open(index) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise ValueError(f"{index} is empty; it needs one line per image")
    return [(os.path.join(folder, row["file_name"]), row["text"]) for row in rows]


def read_pretrain_images(data, batch_size: int, size: int, seed: int) -> tuple[list, list, list]:
    """(captions, size x size x 3 float arrays, each image's (height, width) before the resize) of batch_size
    drawn pairs; an unreadable file is left out with a warning (scraped data has broken files: one must not
    end a run)."""
    rng = np.random.default_rng(seed)
    captions, arrays, original_sizes = [], [], []
    for i in rng.choice(len(data), size=min(len(data), batch_size), replace=False):
        path, caption = data[i]
        try:
            with Image.open(path) as image:
                arrays.append(np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32))
                original_sizes.append((image.height, image.width))
            captions.append(caption)
        except (OSError, ValueError) as error:
            warnings.warn(f"--pretrain-data: left out the unreadable {path} ({error})", stacklevel=2)
    return captions, arrays, original_sizes


def pretrain_loss(
    pipe, unet, captions: list[str], arrays: list[np.ndarray], seed: int, uncond_prob: float = 0.0,
    original_sizes: list[tuple[int, int]] | None = None,
) -> torch.Tensor:  # fmt: skip
    """L_pre: the ordinary denoising loss E ||eps - eps_theta(x_t, t, c)||^2 on image-caption data
    (v instead of eps for v-prediction models). An `uncond_prob` share of the captions c is the empty
    caption, as in SD's own pretraining (SDXL: the zeros its guidance takes as unconditional input):
    sampling with guidance w uses eps_uncond + w * (eps_cond - eps_uncond), and at 0 L_pre trains eps_cond
    only (eps_uncond moves only through the shared weights). SDXL's size ids carry each image's
    original_sizes (height, width) before its resize, as in SDXL's own training."""
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0  # (N, 3, H, W) in [-1, 1]
    device = pipe.unet.device
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels.to(device, pipe.vae.dtype)).latent_dist.sample(generator)
        latents = latents.float() * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(
            0, pipe.scheduler.config.num_train_timesteps, (len(captions),), generator=generator
        )
        # drawn last, so the noise and timesteps are the same whatever uncond_prob is
        drop = torch.rand(len(captions), generator=generator) < uncond_prob
        captions = ["" if dropped else text for text, dropped in zip(captions, drop.tolist(), strict=True)]
        cond = encode_prompts(pipe, captions)
        if is_sdxl(pipe):  # a dropped caption gets the unconditional input guidance uses: SDXL's are zeros
            for name in ("prompt_embeds", "pooled_prompt_embeds"):
                rows = drop.to(device).reshape(-1, *[1] * (cond[name].ndim - 1))
                cond[name] = torch.where(rows, cond["negative_" + name], cond[name])
            if original_sizes:  # (original height, width, crop top, crop left, target height, width)
                cond["add_time_ids"] = cond["add_time_ids"].clone()
                cond["add_time_ids"][:, :2] = torch.tensor(original_sizes, dtype=cond["add_time_ids"].dtype)
    timesteps = timesteps.to(device)
    noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
    is_v = pipe.scheduler.config.prediction_type == "v_prediction"
    target = pipe.scheduler.get_velocity(latents, noise, timesteps) if is_v else noise
    pred = unet(noisy, timesteps, **unet_conditioning(cond, 1.0, torch.float32)).sample.float()
    return torch.nn.functional.mse_loss(pred, target)
