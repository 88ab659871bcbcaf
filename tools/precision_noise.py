"""How much of the policy ratio after one optimizer step is rounding of the autocast precision, measured on a
UNet outside train.py (docs/training.md, "Precision noise"). Not part of the method.

    python tools/precision_noise.py --model toy --sizes 8                # the toy model, seconds
    python tools/precision_noise.py --model sd2-random --sizes 8,16,32   # SD2's UNet, random weights, minutes

For each latent size and each probed DDIM step: actions are sampled under autocast, one AdamW step of the
clipped surrogate (Eq. 4) is taken on them with random advantages (fp32 weights, as train.py), and the
policy ratio w = p_new / p_old of the same actions is computed in the autocast precision and in fp32.
`noise` is monitor.precision_noise, max |w / w_fp32 - 1|; `fp32 |w - 1|` is what the update itself moved.
"""

import json
import os
import sys
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import monitor
import sampler
from flags import option, parse
from tools.bench import SD2_UNET


@dataclass
class Args:
    model: str = option("toy", "toy (the shipped toy UNet) or sd2-random (SD2 base's UNet, random weights)",
                        choices=["toy", "sd2-random"])  # fmt: skip
    sizes: str = option("8", "comma list of latent sizes (SD2 at 512 px: 64)")
    precision: str = option("bf16", "autocast dtype", choices=["bf16", "fp16"])
    lr: float = option(2e-6, "AdamW learning rate (paper: 2e-6)", above=0)
    clip_range: float = option(1e-4, "clip range of the surrogate (paper: 1e-4)", above=0)
    batch_size: int = option(2, "actions per measurement", at_least=1)
    num_steps: int = option(50, "DDIM steps T")
    probe_steps: str = option("0,25,48", "DDIM steps probed, 0 the noisiest")
    seed: int = option(0, "seed of weights, latents and noise", at_least=0)
    device: str = option("cuda" if torch.cuda.is_available() else "cpu", "torch device")


def unet_of(model: str) -> UNet2DConditionModel:
    if model == "toy":
        return sampler.load_pipeline("toy").unet.requires_grad_(True)
    torch.manual_seed(0)
    return UNet2DConditionModel(**SD2_UNET)  # random weights: the architecture's rounding, not SD2's values


def measure(unet, scheduler, size: int, j: int, args: Args) -> dict:
    """One optimizer step on fresh actions at DDIM step j; the ratio of those actions in both precisions."""
    generator = torch.Generator().manual_seed(args.seed + j)
    channels, width = unet.config.in_channels, unet.config.cross_attention_dim
    latents = torch.randn(args.batch_size, channels, size, size, generator=generator).to(args.device)
    embeds = torch.randn(args.batch_size, 8, width, generator=generator).to(args.device)
    device_type = torch.device(args.device).type
    timestep, autocast = scheduler.timesteps[j], torch.autocast(device_type, sampler.DTYPES[args.precision])
    fp32 = torch.autocast(device_type, enabled=False)

    def log_prob(precision, action):
        with precision:
            cond = {"prompt_embeds": embeds, "negative_prompt_embeds": embeds * 0}
            mean, std = sampler.step_mean(unet, scheduler, latents, timestep, cond, 7.0, 1.0)
            return sampler.gaussian_log_prob(action, mean, std), mean, std

    with torch.no_grad():
        _, mean, std = log_prob(autocast, latents)
        action = mean + std * torch.randn(mean.shape, generator=generator).to(args.device)
        before, fp32_before = log_prob(autocast, action)[0], log_prob(fp32, action)[0]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-2, fused=True)
    advantages = torch.randn(args.batch_size, generator=generator).to(args.device)
    ratio = torch.exp(log_prob(autocast, action)[0] - before)
    loss = torch.maximum(
        -advantages * ratio, -advantages * ratio.clamp(1 - args.clip_range, 1 + args.clip_range)
    )
    loss.mean().backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    saved = {k: v.clone() for k, v in unet.state_dict().items()}
    optimizer.step()
    with torch.no_grad():
        after, fp32_after = log_prob(autocast, action)[0], log_prob(fp32, action)[0]
    unet.load_state_dict(saved)  # every measurement starts from the same weights
    unet.zero_grad(set_to_none=True)
    return {"size": size, "ddim_step": j, "noise": monitor.precision_noise(before, after, fp32_before,
                                                                           fp32_after).item(),
            "autocast |w - 1|": (torch.exp(after - before) - 1).abs().max().item(),
            "fp32 |w - 1|": (torch.exp(fp32_after - fp32_before) - 1).abs().max().item()}  # fmt: skip


def main(argv=None) -> list[dict]:
    args, _ = parse(Args, __doc__, argv)
    unet = unet_of(args.model).to(args.device)
    scheduler = sampler.stable_diffusion_scheduler()
    scheduler.set_timesteps(args.num_steps)
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        for j in [int(s) for s in args.probe_steps.split(",")]:
            rows.append(measure(unet, scheduler, size, j, args))
            print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
