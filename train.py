"""Algorithm 1 of Zhang et al. 2024: clipped policy-gradient RL of a text-to-image diffusion model on
several rewards jointly, with an optional pretraining loss, from one CPU process to many GPUs.

    python train.py --model tiny --rewards brightness --iterations 4 --out runs/tiny  # smoke run, no download
    torchrun --standalone --nproc_per_node=8 train.py --model stabilityai/stable-diffusion-2-base \\
        --rewards pref,skin,comp --group-size 16 --mixed-precision bf16 --gradient-checkpointing

Each iteration visits every task in turn (the paper's Algorithm 1):
    1. SAMPLING   this rank's prompts -> stochastic DDIM trajectories with per-step log-probs (no grad)
    2. REWARDS    score, gather over all ranks, batch-level advantages A = (r - mean) / (std + 1e-7)
    3. TRAINING   K random DDIM steps; for each, one optimizer step of the clipped surrogate
                  (--inner-epochs passes over the same samples, K fresh steps each)
then one pretraining (L_pre) step when --pretrain-data is given. Outputs in --out: metrics.jsonl,
checkpoint-<iteration>/ and final/ (loadable by evaluate.py --checkpoint), sample grids.
"""

import contextlib
import dataclasses
import functools
import json
import os
import resource
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

import sampler
import toyworld
from flags import build_parser, option


@dataclass
class Args:
    model: str = option("toy", "'toy' (ships with the repo), 'tiny' (random), a hub id or a diffusers folder "
                               "(paper: SD2 base)")  # fmt: skip
    rewards: str = option("pref,skin,comp", "comma list of tasks trained jointly")
    prompt_file: str = option("", "text file of prompts, one per line, for pref and the weight-free rewards")
    iterations: int = option(1000, "RL iterations (paper: about 1000)")
    batch_size: int = option(16, "images per rank per task per iteration (paper: 16)")
    group_size: int = option(16, "images per prompt for minibatch rewards such as skin (paper: 16)")
    images_per_prompt: int = option(1, "images per prompt for the other rewards (paper: 1); above 1 with "
                                       "--per-prompt-advantages: a baseline per prompt")  # fmt: skip
    micro_batch: int = option(
        0, "images per forward/backward in the update, gradients accumulated (0: the whole batch)"
    )
    num_steps: int = option(50, "DDIM steps T (paper: 50)")
    eta: float = option(1.0, "DDIM stochasticity; must be > 0 (paper: 1.0)")
    guidance: float = option(7.0, "classifier-free guidance scale (paper: 7.0)")
    train_timesteps: int = option(5, "DDIM steps trained per iteration, one optimizer step each (paper: 5)")
    inner_epochs: int = option(1, "passes over each batch, each with fresh --train-timesteps steps "
                                  "(DDPO's num_inner_epochs; paper: 1)")  # fmt: skip
    clip_range: float = option(1e-4, "PPO clip epsilon (paper: 1e-4)")
    adv_clip: float = option(10.0, "advantages clamped to [-c, c] (paper code: 10)")
    per_prompt_advantages: bool = option(
        False, "normalise rewards per prompt (DDPO's stat tracking) instead of per batch"
    )
    lr: float = option(2e-6, "AdamW learning rate (paper: 2e-6)")
    weight_decay: float = option(1e-2, "AdamW weight decay (paper: 1e-2)")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    pretrain_data: str = option(
        "", "folder of images + metadata.jsonl captions for L_pre (empty: no pretraining loss)"
    )
    pretrain_weight: float = option(1.0, "beta, the weight of L_pre (paper: not given)")
    pretrain_batch_size: int = option(16, "L_pre images per rank (paper: 16)")
    pretrain_uncond_prob: float = option(
        0.0,
        "share of L_pre captions replaced by the empty caption, to train the unconditional prediction "
        "that guidance uses too (SD's pretraining: 0.1; 0: the conditional one only)",
    )
    lora_rank: int = option(0, "train LoRA adapters of this rank instead of the full UNet "
                               "(0: full fine-tune, as the paper; needs peft)")  # fmt: skip
    mixed_precision: str = option("no", "no|fp16|bf16 autocast (paper: bf16)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward")
    compile: bool = option(
        False, "torch.compile the UNet (minutes of compilation first; bench.py: 0.77x forward on CPU)"
    )
    seed: int = option(0, "seed of prompts, noise and trained timesteps")
    out: str = option("runs/train", "output folder")
    resume: str = option("", "checkpoint folder to continue from, or 'latest'")
    save_every: int = option(50, "checkpoint every N iterations (and at the end)")
    sample_every: int = option(10, "save a PNG grid of samples every N iterations")
    log_with: str = option("none", "none|tensorboard|wandb")


def parse_args(argv=None) -> Args:
    parser = build_parser(Args, __doc__)
    args = Args(**vars(parser.parse_args(argv)))
    if args.eta <= 0:
        parser.error("--eta must be > 0: with eta = 0 every DDIM step is deterministic and has no log-prob")
    if not 1 <= args.train_timesteps <= args.num_steps:
        parser.error(f"--train-timesteps must be between 1 and --num-steps ({args.num_steps})")
    if args.inner_epochs < 1:
        parser.error("--inner-epochs must be >= 1")
    if args.save_every < 1:
        parser.error("--save-every must be >= 1 (a checkpoint is also written at the end and on SIGTERM)")
    if args.seed < 0:
        parser.error("--seed must be >= 0 (it seeds numpy, which takes no negative seeds)")
    if args.mixed_precision not in ("no", "fp16", "bf16"):
        parser.error("--mixed-precision must be one of no, fp16, bf16")
    if args.log_with not in ("none", "tensorboard", "wandb"):
        parser.error("--log-with must be one of none, tensorboard, wandb")
    if not 0 <= args.pretrain_uncond_prob <= 1:
        parser.error(f"--pretrain-uncond-prob must be between 0 and 1, not {args.pretrain_uncond_prob}")
    if args.micro_batch < 0 or (args.micro_batch and args.batch_size % args.micro_batch):
        parser.error(
            f"--batch-size ({args.batch_size}) must be a multiple of --micro-batch ({args.micro_batch})"
        )
    return args


#### Distributed helpers: every rank calls each of them, in the same order ####


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (B, ...) of every rank in rank order: (world * B, ...)."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def barrier():
    if dist.is_initialized():
        dist.barrier()


def exit_distributed():
    """Destroy the process group and end the process at once, without running destructors.

    With gloo (torch 2.13), freeing the process group joins its worker threads while the main thread holds
    the GIL, and a worker still freeing a finished collective's tensors waits for that GIL: a rare hang at
    exit, or an abort ("terminate called without an active exception"). README "Scaling out" has numbers.
    """
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


#### Prompts: a deterministic stream, so that resuming needs only the position ####


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def draw_prompts(sequence, start: int, count: int, seed: int) -> tuple[list, list[int]]:
    """Prompts start .. start+count-1 of an endless stream that reshuffles `sequence` every epoch.
    Returns the (prompt, metadata) items and their indices in `sequence`."""
    n = len(sequence)
    items, indices = [], []
    for position in range(start, start + count):
        epoch, offset = divmod(position, n)
        index = int(epoch_order(n, seed, epoch)[offset])
        items.append(sequence[index])
        indices.append(index)
    return items, indices


def rank_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of the keys (seed, iteration, task, rank): exact resume."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, np.uint64)[0] >> 1)


def group_size(task, args: Args) -> int:
    """Images per prompt: a group stays on one rank, so a minibatch reward sees all of it."""
    return args.group_size if task.minibatch else args.images_per_prompt


#### Advantages: batch-level as the paper, or per prompt as DDPO ####


def compute_advantages(rewards: torch.Tensor, prompt_ids: torch.Tensor, args: Args) -> torch.Tensor:
    """A = (r - mean(r)) / (std(r) + 1e-7) over the GLOBAL batch, clamped to [-adv_clip, adv_clip].
    With --per-prompt-advantages, mean and std are those of the same prompt's rewards (where the
    prompt has at least two samples in the batch), as DDPO's per-prompt stat tracking."""
    mean = torch.full_like(rewards, rewards.mean().item())
    std = torch.full_like(rewards, rewards.std(correction=0).item())
    if args.per_prompt_advantages:
        for p in prompt_ids.unique():
            same = prompt_ids == p
            if same.sum() > 1:
                mean[same], std[same] = rewards[same].mean(), rewards[same].std(correction=0)
    return ((rewards - mean) / (std + 1e-7)).clamp(-args.adv_clip, args.adv_clip)


#### The pretraining loss L_pre ####


def load_pretrain_data(folder: str) -> list[tuple[str, str]]:
    """(image path, caption) pairs from folder/metadata.jsonl lines {"file_name": ..., "text": ...}."""
    index = os.path.join(folder, "metadata.jsonl")
    if not os.path.isfile(index):
        raise FileNotFoundError(
            f"--pretrain-data {folder} has no metadata.jsonl; see README 'Pretraining loss'"
        )
    with open(index) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise ValueError(f"{index} is empty; it needs one line per image")
    return [(os.path.join(folder, row["file_name"]), row["text"]) for row in rows]


def read_pretrain_images(data, batch_size: int, size: int, seed: int) -> tuple[list[str], list[np.ndarray]]:
    """(captions, HxWx3 float arrays) of batch_size drawn pairs; an unreadable file is left out with a
    warning (scraped data has broken files: one must not end a run)."""
    rng = np.random.default_rng(seed)
    captions, arrays = [], []
    for i in rng.choice(len(data), size=min(len(data), batch_size), replace=False):
        path, caption = data[i]
        try:
            with Image.open(path) as image:
                arrays.append(np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32))
            captions.append(caption)
        except (OSError, ValueError) as error:
            warnings.warn(f"--pretrain-data: left out the unreadable {path} ({error})", stacklevel=2)
    return captions, arrays


def pretrain_loss(
    pipe, unet, captions: list[str], arrays: list[np.ndarray], seed: int, uncond_prob: float = 0.0
) -> torch.Tensor:
    """L_pre: the ordinary denoising loss E ||eps - eps_theta(x_t, t, c)||^2 on image-caption data
    (v instead of eps for v-prediction models). An `uncond_prob` share of the captions c is the empty
    caption, as in SD's own pretraining: sampling with guidance w uses eps_uncond + w * (eps_cond -
    eps_uncond), and at 0 L_pre trains eps_cond only (eps_uncond moves only through the shared weights)."""
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
        prompt_embeds, _ = sampler.encode_prompts(pipe, captions)
    timesteps = timesteps.to(device)
    noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
    is_v = pipe.scheduler.config.prediction_type == "v_prediction"
    target = pipe.scheduler.get_velocity(latents, noise, timesteps) if is_v else noise
    pred = unet(noisy, timesteps, encoder_hidden_states=prompt_embeds.float()).sample.float()
    return torch.nn.functional.mse_loss(pred, target)


#### Checkpoints: atomic (temp folder + rename), exact resume ####


def weight_checksums(parameters) -> torch.Tensor:
    """(world, 2): sum and sum of squares of the trained weights on each rank. DDP keeps replicas
    identical; a difference means the ranks diverged and the run must stop before saving."""
    # One parameter at a time: a float64 copy of all weights at once would double a large model's memory.
    sums = sum(
        torch.stack([p.detach().double().sum(), p.detach().double().square().sum()]) for p in parameters
    )
    return all_gather(sums[None]).cpu()


def save_checkpoint(
    path: str, unet, optimizer, scaler, iteration: int, args: Args, lora_config=None, checksums=None, world=1
):
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if lora_config is None:
        unet.save_pretrained(os.path.join(tmp, "unet"))
    else:
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        lora_config.save_pretrained(os.path.join(tmp, "lora"))
        save_file(get_peft_model_state_dict(unet), os.path.join(tmp, "lora", "adapter_model.safetensors"))
    state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "iteration": iteration}
    torch.save({**state, "rank_checksums": checksums}, os.path.join(tmp, "train_state.pt"))
    with open(os.path.join(tmp, "args.json"), "w") as f:  # read back by check_resumable
        json.dump({**dataclasses.asdict(args), "world_size": world}, f, indent=2)
    old = path + ".old"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out: str) -> str:
    names = (
        [n for n in os.listdir(out) if n.startswith("checkpoint-") and n[11:].isdigit()]
        if os.path.isdir(out)
        else []
    )
    if not names:
        raise FileNotFoundError(f"--resume latest: no checkpoint-<iteration> folder in {out}")
    return os.path.join(out, max(names, key=lambda n: int(n[11:])))


# What fixes the prompt, noise and timestep stream and the weights' format: these must match to resume.
RUN_DEFINING = ("model", "rewards", "seed", "batch_size", "group_size", "images_per_prompt", "num_steps",
                "train_timesteps", "inner_epochs", "lora_rank", "prompt_file")  # fmt: skip
BOOKKEEPING = ("iterations", "out", "resume", "save_every", "sample_every", "log_with")


def check_resumable(path: str, args: Args, world: int, master: bool = True):
    """Refuse to resume a checkpoint under arguments that would not continue it exactly."""
    if not os.path.isfile(os.path.join(path, "train_state.pt")):
        raise FileNotFoundError(f"--resume: {path} is not a train.py checkpoint (no train_state.pt)")
    with open(os.path.join(path, "args.json")) as f:
        saved = json.load(f)
    changed = [
        f"--{name.replace('_', '-')} {saved[name]!r} -> {getattr(args, name)!r}"
        for name in RUN_DEFINING
        if name in saved and saved[name] != getattr(args, name)
    ]
    if changed:
        raise ValueError(
            f"--resume {path}: the checkpoint was made with other settings ({'; '.join(changed)}); "
            "resume with the checkpoint's values (its args.json), or start a new run in another --out"
        )
    tuned = [
        f"--{name.replace('_', '-')} {saved[name]!r} -> {value!r}"
        for name, value in dataclasses.asdict(args).items()
        if name not in RUN_DEFINING + BOOKKEEPING and name in saved and saved[name] != value
    ]
    if tuned and master:  # allowed (say, a lower learning rate from here on), but said
        warnings.warn(f"--resume {path}: continuing with changed settings: {'; '.join(tuned)}", stacklevel=2)
    if saved.get("world_size", world) != world and master:
        warnings.warn(
            f"--resume {path}: {saved['world_size']} ranks made the checkpoint, {world} continue it; the "
            "global batch and the noise change, so the run continues but not exactly as it would have",
            stacklevel=2,
        )


def save_grid(images: torch.Tensor, path: str, columns: int = 8):
    """images (N, 3, H, W) in [0, 1] -> one PNG."""
    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    grid = torch.zeros(3, rows * h, columns * w)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


#### Logging ####


def open_tracker(args: Args):
    """(track, close): track(row) sends a metrics row's numbers to TensorBoard or W&B; close() flushes."""

    def scalars(row):  # "comp/reward_mean": 0.61, ...
        return {f"{row['task']}/{k}": v for k, v in row.items() if isinstance(v, (int, float))}

    if args.log_with == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(args.out, "tensorboard"))

        def track(row):
            for tag, value in scalars(row).items():
                writer.add_scalar(tag, value, row["iteration"])

        return track, writer.close
    if args.log_with == "wandb":
        import wandb

        wandb.init(project="large-scale-rl-diffusion", config=dataclasses.asdict(args), dir=args.out)
        return lambda row: wandb.log(scalars(row), step=row["iteration"]), wandb.finish
    return lambda row: None, lambda: None


def main(args: Args):
    #### Setup: processes, devices, models ####
    ddp = "RANK" in os.environ
    if ddp:
        local_rank = int(os.environ["LOCAL_RANK"])
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        rank, world = 0, 1
    master = rank == 0
    torch.manual_seed(args.seed)  # identical LoRA init on every rank (DDP also broadcasts rank 0's weights)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    autocast = (
        torch.autocast(device.type, dtype=dtype) if args.mixed_precision != "no" else contextlib.nullcontext()
    )
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")

    task_names = [name.strip() for name in args.rewards.split(",") if name.strip()]
    tasks = [toyworld.load_task(name, args.model, device, args.prompt_file or None) for name in task_names]
    prompt_lists = [task.prompts(task.splits[0], args.seed) for task in tasks]
    for task, prompts in zip(tasks, prompt_lists, strict=True):
        group = group_size(task, args)
        if args.batch_size % group:
            raise ValueError(
                f"--batch-size ({args.batch_size}) must be a multiple of the images per prompt ({group}, "
                f"--group-size for minibatch rewards, --images-per-prompt for others) for {task.name!r}"
            )
        if len(prompts) < world:
            raise ValueError(
                f"task {task.name!r} has {len(prompts)} prompts for {world} ranks; give more prompts"
            )

    # The trained UNet loads and stays in fp32 (loading it in bf16 first would round the base weights);
    # the frozen text encoder and VAE run in the inference dtype.
    pipe = sampler.load_pipeline(args.model, device=device)
    pipe.text_encoder.to(dtype)
    torch.nn.Module.to(pipe.vae, dtype)  # torch's .to: diffusers' warns of fp32 modules this VAE lacks
    unet = pipe.unet
    lora_config = None
    if args.lora_rank > 0:
        from peft import LoraConfig

        lora_config = LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_rank,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
        unet.add_adapter(lora_config)  # only the adapters require grad
    else:
        unet.requires_grad_(True)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.compile:
        unet.compile()  # in place: the module, its parameter names and checkpoints stay as they are
    trainable = [p for p in unet.parameters() if p.requires_grad]
    # fused: one kernel for all parameters instead of a loop of small ops (4x faster step on CPU, bench.py)
    optimizer = torch.optim.AdamW(
        trainable, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay, fused=True
    )
    model = (
        torch.nn.parallel.DistributedDataParallel(
            unet, device_ids=[device] if device.type == "cuda" else None
        )
        if ddp
        else unet
    )
    pretrain_data = load_pretrain_data(args.pretrain_data) if args.pretrain_data else None

    #### Resume: weights, optimizer, iteration; prompts and noise are functions of (seed, iteration) ####
    start = 0
    if not args.resume:
        # a fresh run must not mix with another run's checkpoints (--resume latest would pick them up)
        found = os.path.isdir(args.out) and any(n.startswith("checkpoint-") for n in os.listdir(args.out))
        if all_mean(torch.tensor([float(found)], device=device)).item() > 0:  # every rank raises together
            raise FileExistsError(
                f"{args.out} holds checkpoints of an earlier run: continue it with --resume latest, "
                "or pass another --out (or delete the folder)"
            )
    else:
        path = latest_checkpoint(args.out) if args.resume == "latest" else args.resume
        check_resumable(path, args, world, master)
        state = torch.load(os.path.join(path, "train_state.pt"), map_location=device, weights_only=True)
        if lora_config is None:
            sampler.load_checkpoint_weights(pipe, path)
        else:
            sampler.load_lora_weights(unet, os.path.join(path, "lora"))
        optimizer.load_state_dict(state["optimizer"])  # this also restores the checkpoint's lr ...
        for group in optimizer.param_groups:  # ... so this run's --lr and --weight-decay go back in
            group["lr"], group["weight_decay"] = args.lr, args.weight_decay
        scaler.load_state_dict(state["scaler"])
        start = state["iteration"]

    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if master:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(dataclasses.asdict(args), f, indent=2)
        if os.path.exists(metrics_path):  # keep only the history up to the checkpoint we continue from
            with open(metrics_path) as f:  # a line cut off by a kill has no newline: drop it
                lines = [line for line in f if line.endswith("\n")]
                kept = [line for line in lines if start and json.loads(line)["iteration"] < start]
            with open(metrics_path, "w") as f:
                f.writelines(kept)
        track, close_tracker = open_tracker(args)
    barrier()

    stop = torch.zeros(1)  # set by SIGTERM (cluster preemption): save and exit at the end of the iteration
    signal.signal(signal.SIGTERM, lambda *_: stop.fill_(1))

    def warn(message: str):
        if master:  # every rank hits the same guards; one message is enough
            warnings.warn(message, stacklevel=2)

    def log(row: dict):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            track(row)

    def save(name: str, iteration: int):
        checksums = weight_checksums(trainable)
        if not torch.equal(checksums, checksums[:1].expand_as(checksums)):
            raise RuntimeError(
                f"the ranks' weights diverged (checksums {checksums.tolist()}); not saving {name}"
            )
        if master:
            path = os.path.join(args.out, name)
            save_checkpoint(path, unet, optimizer, scaler, iteration, args, lora_config, checksums, world)
        barrier()

    stopping = False
    bar = tqdm(range(start, args.iterations), initial=start, total=args.iterations, disable=not master)
    for iteration in bar:
        for task_index, (task, prompts) in enumerate(zip(tasks, prompt_lists, strict=True)):
            t0 = time.time()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)

            #### SAMPLING ####
            group = group_size(task, args)
            per_rank = args.batch_size // group  # prompts per rank
            first = (iteration * world + rank) * per_rank  # this rank's place in the endless prompt stream
            items, indices = draw_prompts(prompts, first, per_rank, args.seed + task_index)
            batch_prompts = [prompt for prompt, _ in items for _ in range(group)]
            metadata = [
                {**meta, "group": first + i} for i, (_, meta) in enumerate(items) for _ in range(group)
            ]
            prompt_ids = torch.tensor([index for index in indices for _ in range(group)])
            generator = torch.Generator().manual_seed(rank_seed(args.seed, iteration, task_index, rank))
            with autocast:
                traj = sampler.sample(pipe, batch_prompts, args.num_steps, args.guidance, args.eta, generator)
            latents = traj["latents"]  # (B, T+1, C, h, w)
            old_log_probs = traj["log_probs"]  # (B, T)
            t1 = time.time()

            #### REWARDS ####
            rewards, info = task.reward(traj["images"], batch_prompts, metadata)  # (B,)
            global_rewards = all_gather(rewards.float().to(device)).cpu()  # (world * B,)
            global_prompt_ids = all_gather(prompt_ids.to(device)).cpu()
            if not torch.isfinite(global_rewards).all():
                warn(f"iteration {iteration} {task.name}: non-finite rewards, update skipped")
                log({
                    "iteration": iteration,
                    "task": task.name,
                    "samples": len(global_rewards),
                    "non_finite_rewards": int((~torch.isfinite(global_rewards)).sum()),
                    "skipped_steps": args.train_timesteps * args.inner_epochs,
                    "seconds": time.time() - t0,
                })  # fmt: skip
                continue  # every rank sees the same gathered rewards, so every rank skips together
            advantages = compute_advantages(global_rewards, global_prompt_ids, args)
            advantages = advantages[rank * args.batch_size : (rank + 1) * args.batch_size].to(device)  # (B,)
            t2 = time.time()

            #### TRAINING: one optimizer step per drawn DDIM step (the paper's Algorithm 1) ####
            # The UNet stays in eval mode (it has no dropout): sampling and training compute the same
            # function, so w = 1 exactly at the first trained step.
            step_order = np.random.default_rng([args.seed, iteration, task_index])
            trained = np.concatenate([
                step_order.choice(args.num_steps, size=args.train_timesteps, replace=False)
                for _ in range(args.inner_epochs)
            ])  # fmt: skip
            micro = args.micro_batch or args.batch_size
            stats = []  # per trained step: loss, approx_kl, clipfrac, max |ratio - 1|, skipped, grad norm
            for j in trained:
                optimizer.zero_grad(set_to_none=True)
                step_stats = torch.zeros(4, device=device)
                for m in range(0, args.batch_size, micro):
                    rows = slice(m, m + micro)
                    sync = m + micro >= args.batch_size or not ddp
                    with contextlib.nullcontext() if sync else model.no_sync(), autocast:
                        log_prob = sampler.step_log_prob(
                            model,
                            pipe.scheduler,
                            latents[rows, j],
                            latents[rows, j + 1],
                            traj["timesteps"][j],
                            traj["prompt_embeds"][rows],
                            traj["negative_prompt_embeds"][rows],
                            args.guidance,
                            args.eta,
                        )
                    # Eq. 4: w_t = p_theta / p_theta_old; J = min(w A, clip(w, 1 - eps, 1 + eps) A)
                    log_ratio = log_prob - old_log_probs[rows, j]
                    ratio = torch.exp(log_ratio)
                    pg_loss1 = -advantages[rows] * ratio
                    pg_loss2 = -advantages[rows] * ratio.clamp(1 - args.clip_range, 1 + args.clip_range)
                    loss = torch.maximum(pg_loss1, pg_loss2).mean()
                    share = len(ratio) / args.batch_size  # this micro-batch's part of the batch mean
                    scaler.scale(loss * share).backward()
                    ratio, log_ratio = ratio.detach(), log_ratio.detach()
                    step_stats += share * torch.stack([
                        loss.detach(),
                        0.5 * (log_ratio**2).mean(),  # approx_kl, as DDPO
                        ((ratio - 1).abs() > args.clip_range).float().mean(),  # clipfrac
                        torch.zeros((), device=device),
                    ])  # fmt: skip
                    step_stats[3] = torch.maximum(step_stats[3], (ratio - 1).abs().max())
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
                # DDP averaged the gradients, so every rank sees the same norm and skips together.
                skipped = not torch.isfinite(grad_norm)
                if skipped:
                    warn(f"iteration {iteration} {task.name}: non-finite gradient, step skipped")
                    optimizer.zero_grad(set_to_none=True)
                    scaler.update()
                else:
                    scaler.step(optimizer)
                    scaler.update()
                skip = torch.tensor([float(skipped)], device=device)
                # the gradient norm before clipping (0 when the step was skipped)
                norm = grad_norm.detach().float().nan_to_num(0.0, 0.0, 0.0).reshape(1)
                stats.append(torch.cat([step_stats, skip, norm]))
            stats = all_mean(torch.stack(stats)).cpu()  # (inner_epochs * K, 6), averaged over ranks
            if stats[0, 3] > 1e-3:
                warn(
                    f"the policy ratio before the first update is off by {stats[0, 3]:.2e}: sampling "
                    "and training disagree (eta, guidance, scheduler or precision)"
                )
            t3 = time.time()

            if device.type == "cuda":
                peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
            else:
                peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS
            row = {
                "iteration": iteration,
                "task": task.name,
                "reward_mean": global_rewards.mean().item(),
                "reward_std": global_rewards.std(correction=0).item(),
                "samples": len(global_rewards),
                "loss": stats[:, 0].mean().item(),
                "approx_kl": stats[:, 1].mean().item(),
                "clipfrac": stats[:, 2].mean().item(),
                "approx_kl_per_step": stats[:, 1].tolist(),
                "clipfrac_per_step": stats[:, 2].tolist(),
                "grad_norm_per_step": stats[:, 5].tolist(),
                "trained_steps": trained.tolist(),  # the DDIM step of each per-step entry, in training order
                "ratio_error_first": stats[0, 3].item(),
                "skipped_steps": int(stats[:, 4].sum().item()),
                "seconds": t3 - t0,
                "seconds_sampling": t1 - t0,
                "seconds_reward": t2 - t1,
                "seconds_update": t3 - t2,
                "peak_memory_mb": peak_mb,
                **{f"reward_{k}": v for k, v in info.items()},
            }
            log(row)
            if master and args.sample_every and iteration % args.sample_every == 0:
                save_grid(
                    traj["images"][:16], os.path.join(args.out, f"samples-{iteration:05d}-{task.name}.png")
                )
            bar.set_postfix({task.name: f"{row['reward_mean']:.3f}"})

        #### PRETRAINING LOSS (L_pre), one step after the RL steps (Algorithm 1) ####
        if pretrain_data is not None:
            t0 = time.time()
            seed = rank_seed(args.seed, iteration, len(tasks), rank)
            size = pipe.unet.config.sample_size * pipe.vae_scale_factor
            captions, arrays = read_pretrain_images(pretrain_data, args.pretrain_batch_size, size, seed)
            # decided together: a rank that raised alone would leave the others waiting in a collective
            if all_mean(torch.tensor(float(not captions), device=device)).item() > 0:
                raise ValueError(
                    f"--pretrain-data: at iteration {iteration} some rank could read none of the "
                    f"{min(len(pretrain_data), args.pretrain_batch_size)} images it drew (see the warnings); "
                    "fix or remove the broken files, then continue with --resume latest"
                )
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = pretrain_loss(pipe, model, captions, arrays, seed, args.pretrain_uncond_prob)
            scaler.scale(args.pretrain_weight * loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
            skipped = not torch.isfinite(grad_norm)  # the same on every rank, as for the RL steps
            if skipped:
                warn(f"iteration {iteration} pretrain: non-finite gradient, step skipped")
                optimizer.zero_grad(set_to_none=True)
            else:
                scaler.step(optimizer)
            scaler.update()
            log(
                {
                    "iteration": iteration,
                    "task": "pretrain",
                    "loss": all_mean(loss.detach()).item(),
                    # of beta * L_pre before clipping, 0 when skipped, as grad_norm_per_step
                    "grad_norm": 0.0 if skipped else grad_norm.item(),
                    "skipped_steps": int(skipped),
                    "seconds": time.time() - t0,
                }
            )

        #### CHECKPOINT: every rank checks the replicas agree, rank 0 writes, everyone waits ####
        done = iteration + 1
        stopping = all_mean(stop.to(device)).item() > 0  # every rank agrees, so nobody hangs
        if done % args.save_every == 0 or done == args.iterations or stopping:
            save(f"checkpoint-{done}", done)
        if stopping:
            if master:
                print(f"SIGTERM: saved checkpoint-{done}; continue with --resume latest")
            break

    if not stopping:
        save("final", args.iterations)
    bar.close()
    if master:
        close_tracker()
    if ddp:
        exit_distributed()  # every rank has saved and passed save()'s barrier: main() does not return


if __name__ == "__main__":
    main(parse_args())
