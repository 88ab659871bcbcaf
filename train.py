"""Algorithm 1 of Zhang et al. 2024: clipped policy-gradient RL of a text-to-image diffusion model on
several rewards jointly, with an optional pretraining loss, from one CPU process to many GPUs.

    python train.py --model tiny --rewards brightness --iterations 4 --out runs/tiny  # smoke run, no download
    torchrun --standalone --nproc_per_node=8 train.py --rewards pref,skin,comp  # the paper: SD2 base, bf16

main() at the bottom is the paper's loop. Each iteration visits every task in turn:
    1. sample_batch        this rank's prompts -> DDIM trajectories with per-step log-probs (no grad)
    2. task.reward         scores, gathered from all ranks -> global_advantages A = (r - mean) / (std + 1e-7)
    3. ppo_update          K random DDIM steps, one optimizer step of the clipped surrogate (Eq. 4) each
then pretrain_step (L_pre) with --pretrain-data, and checkpoint_or_stop. What lands in --out (metrics.jsonl,
checkpoint-<iteration>/ and final/ for evaluate.py --checkpoint, sample grids) is described in outputs.py.
"""

import contextlib
import copy
import dataclasses
import datetime
import json
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import monitor
import outputs
import rewards
import sampler
import toyworld
from flags import option, parse


# fmt: off
@dataclass
class Args:
    model: str = option(sampler.PAPER_MODEL, "a hub id or a diffusers folder of SD 1.x / 2.x (the paper's: "
                        "SD2 base) or SDXL, 'toy' (the toy world, ships with the repo, offline) or 'tiny' / "
                        "'tiny-xl' (random)")
    rewards: str = option("pref,skin,comp", "comma list of tasks trained jointly")
    prompt_file: str = option("", "text file of prompts, one per line, for pref and the weight-free rewards")
    iterations: int = option(1000, "RL iterations (paper: about 1000)", at_least=1)
    batch_size: int = option(16, "images per rank per task per iteration (paper: 16)", at_least=1)
    group_size: int = option(16, "images per prompt for minibatch rewards such as skin (paper: 16)",
                             at_least=1)
    images_per_prompt: int = option(1, "images per prompt for the other rewards (paper: 1); above 1 with "
                                       "--per-prompt-advantages: a baseline per prompt", at_least=1)
    micro_batch: int = option(0, "images per forward/backward in the update, gradients accumulated "
                                 "(0: the whole batch)", at_least=0)
    num_steps: int = option(50, "DDIM steps T (paper: 50)", at_least=1)
    eta: float = option(1.0, "DDIM stochasticity (paper: 1.0); at 0 a step has no log-prob", above=0)
    guidance: float = option(7.0, "classifier-free guidance scale (paper: 7.0)")
    train_timesteps: int = option(5, "DDIM steps trained per iteration, one optimizer step each (paper: 5)",
                                  at_least=1)
    timestep_window: str = option(":", "LO:HI: train only DDIM steps LO <= j < HI, 0 the noisiest; an end "
                                       "left out is 0 or --num-steps (':' every step, the paper)")
    timestep_weight: str = option("none", "c_t times step t's log-ratio (none: 1, the paper); sensitivity: "
                                          "c_t ~ sigma_t / |d mu/d output|", choices=sampler.STEP_WEIGHTS)
    inner_epochs: int = option(1, "passes over each batch, each with fresh --train-timesteps steps "
                                  "(DDPO's num_inner_epochs; paper: 1)", at_least=1)
    clip_range: float = option(1e-4, "PPO clip epsilon (paper: 1e-4)", above=0)
    adv_clip: float = option(10.0, "advantages clamped to [-c, c] (paper code: 10)", above=0)
    per_prompt_advantages: bool = option(False, "normalise rewards per prompt (DDPO's stat tracking) "
                                                "instead of per batch")
    lr: float = option(2e-6, "AdamW learning rate (paper: 2e-6)", above=0)
    weight_decay: float = option(1e-2, "AdamW weight decay (paper: 1e-2)", at_least=0)
    max_grad_norm: float = option(1.0, "gradient clipping norm", above=0)
    pretrain_data: str = option("", "folder of images + metadata.jsonl captions for L_pre "
                                    "(empty: no pretraining loss)")
    pretrain_weight: float = option(1.0, "beta, the weight of L_pre (paper: not given)", at_least=0)
    pretrain_batch_size: int = option(16, "L_pre images per rank (paper: 16)", at_least=1)
    pretrain_uncond_prob: float = option(0.0, "share of L_pre captions replaced by the empty caption, to "
                                              "train the unconditional prediction that guidance uses too "
                                              "(SD's pretraining: 0.1; 0: the conditional one only)",
                                         at_least=0, at_most=1)
    kl_coef: float = option(0.0, "beta of beta * KL(pi_theta || pi_ref) per trained step, pi_ref the base "
                                 "model's policy (0: none, the paper)", at_least=0)
    ema_decay: float = option(0.0, "decay of an EMA of the trained weights, saved as unet_ema/ (lora_ema/) "
                                   "(0: none, the paper)", at_least=0, at_most=0.99999)
    lr_warmup: int = option(0, "optimizer steps of linear learning-rate warmup (0: none)", at_least=0)
    lora_rank: int = option(0, "train LoRA adapters of this rank instead of the full UNet "
                               "(0: full fine-tune, as the paper; needs peft)", at_least=0)
    mixed_precision: str = option("auto", "autocast dtype; auto: bf16 on CUDA (the paper's), else fp32 (no)",
                                  choices=sampler.PRECISIONS)
    gradient_checkpointing: bool | None = option(None, "recompute activations in backward (default: on with "
                                                       "CUDA, as the paper; off on CPU)")
    compile: bool = option(False, "torch.compile the UNet (minutes of compilation first; "
                                  "tools/bench.py: 0.77x forward on CPU)")
    seed: int = option(0, "seed of prompts, noise and trained timesteps", at_least=0)
    out: str = option("runs/train", "output folder")
    resume: str = option("", "checkpoint folder to continue from, or 'latest'")
    save_every: int = option(50, "checkpoint every N iterations (and at the end)", at_least=1)
    sample_every: int = option(10, "save a PNG grid of samples every N iterations", at_least=0)
    keep_checkpoints: int = option(0, "keep the N newest checkpoint-<n> folders (0: all)", at_least=0)
    log_with: str = option("none", "metrics also to", choices=["none", "tensorboard", "wandb"])
    eval_every: int = option(0, "every N iterations (from 0) each task's held-out prompts, fixed prompts and "
                                "seeds: rows with eval_reward_mean (0: never)", at_least=0)
    eval_rewards: str = option("", "comma list of gold rewards also scored at --eval-every, e.g. aesthetic")
    dist_timeout: float = option(1800.0, "seconds a rank waits in a collective before the job fails, so "
                                         "that a stuck rank ends the run (torch's default: 1800)", above=0)
# fmt: on


def parse_args(argv=None) -> Args:
    args, parser = parse(Args, __doc__, argv)  # each field's bounds are checked there
    try:  # canonical LO:HI, so that --resume compares windows, not spellings
        window = sampler.timestep_window(args.timestep_window, args.num_steps, args.train_timesteps)
        args.timestep_window = f"{window.start}:{window.stop}"
    except ValueError as error:  # not LO:HI, empty, outside 0:--num-steps, fewer steps than K
        parser.error(str(error))
    if args.micro_batch and args.batch_size % args.micro_batch:
        parser.error(
            f"--batch-size ({args.batch_size}) must be a multiple of --micro-batch ({args.micro_batch})"
        )
    if not [name for name in args.rewards.split(",") if name.strip()]:
        parser.error(f"--rewards {args.rewards!r} names no task; pass e.g. --rewards pref,skin,comp")
    if os.path.isfile(args.out):
        parser.error(f"--out {args.out} is a file; pass a folder")
    return args


#### Distributed helpers: every rank calls each of them, in the same order ####


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (B, ...) of every rank in rank order: (world_size * B, ...)."""
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
    """Destroy the process group and end the process at once, without running destructors: freeing gloo's
    process group can hang or abort at exit with torch 2.13 (docs/engineering-notes.md has the evidence)."""
    dist.destroy_process_group()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


#### Seeds: pure functions of (seed, iteration, task, rank), so that resuming needs only the iteration ####


def rank_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of the keys (seed, iteration, task, rank): exact resume."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, np.uint64)[0] >> 1)


def group_size(task, args: Args) -> int:
    """Images per prompt: a group stays on one rank, so a minibatch reward sees all of it."""
    return args.group_size if task.minibatch else args.images_per_prompt


#### Set-up: processes, tasks, model, optimizer, resume, logging ####


@dataclass
class Run:
    """What set-up builds once and every step of Algorithm 1 uses."""

    args: Args
    device: torch.device
    rank: int
    world_size: int
    ddp: bool  # launched by torchrun: the UNet is wrapped in DistributedDataParallel
    autocast: contextlib.AbstractContextManager  # --mixed-precision autocast, or a null context
    scaler: torch.amp.GradScaler  # loss scaling, enabled for fp16 only
    tasks: list  # a rewards.Task per --rewards name, in order
    prompt_lists: list  # each task's training prompts: a sequence of (prompt, metadata)
    pipe: object  # the diffusers pipeline; pipe.unet is the trained UNet (fp32 weights)
    model: torch.nn.Module  # what the update calls: pipe.unet, or DDP around it
    lora_config: object  # a peft LoraConfig with --lora-rank, else None
    trainable: list  # the parameters AdamW updates
    optimizer: torch.optim.Optimizer
    pretrain_data: list | None  # (image path, caption) pairs of L_pre, None without --pretrain-data
    window: range = range(0)  # the DDIM step indices of --timestep-window, from which each update draws
    step_weights: torch.Tensor | None = None  # (T,) c_t of --timestep-weight (sampler.step_weights)
    reference: torch.nn.Module | None = None  # pi_ref of --kl-coef, a frozen base UNet (full fine-tune)
    ema: list | None = None  # --ema-decay: fp32 EMA of each trainable parameter
    gold: list = dataclasses.field(default_factory=list)  # the --eval-rewards tasks
    held_out_lists: list = dataclasses.field(default_factory=list)  # each task's held-out prompts
    optimizer_steps: int = 0  # taken so far, for --lr-warmup (part of exact resume)
    start: int = 0  # the first iteration: the checkpoint's when resuming
    stop: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(1))  # SIGTERM sets it
    track: Callable | None = None  # sends a metrics row to TensorBoard or W&B (rank 0)
    close_tracker: Callable | None = None

    @property
    def master(self) -> bool:
        return self.rank == 0

    def log(self, row: dict, grid=None):
        """One line of OUT/metrics.jsonl (rank 0), mirrored to the tracker with the sample grid if any."""
        if self.master:
            with open(os.path.join(self.args.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
            self.track(row, grid)

    def warn(self, message: str):
        if self.master:  # every rank hits the same guards; one message is enough
            warnings.warn(message, stacklevel=3)


def init_processes(timeout: float) -> tuple[torch.device, int, int, bool]:
    """(device, rank, world_size, ddp): the process group under torchrun, the device from LOCAL_RANK (the
    global rank would break on 2 nodes); one process on its best device otherwise."""
    if "RANK" not in os.environ:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), 0, 1, False
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return device, dist.get_rank(), dist.get_world_size(), True


def load_tasks(args: Args, device, world_size: int) -> tuple[list, list, list, list]:
    """The tasks of --rewards with their training and held-out prompts (--eval-every), the --eval-rewards
    tasks, and their reward models; a batch or prompt list that cannot work stops here, before the UNet."""
    names = [name.strip() for name in args.rewards.split(",") if name.strip()]
    tasks = [toyworld.load_task(name, args.model, device, args.prompt_file or None) for name in names]
    gold = [
        toyworld.load_task(n.strip(), args.model, device) for n in args.eval_rewards.split(",") if n.strip()
    ]
    prompt_lists = [task.prompts(task.splits[0], args.seed) for task in tasks]
    held_out_lists = [task.prompts(task.splits[-1], args.seed) for task in tasks] if args.eval_every else []
    for i, (task, prompts) in enumerate(zip(tasks, prompt_lists, strict=True)):
        group = group_size(task, args)
        if args.batch_size % group:
            raise ValueError(
                f"--batch-size ({args.batch_size}) must be a multiple of the images per prompt ({group}, "
                f"--group-size for minibatch rewards, --images-per-prompt for others) for {task.name!r}"
            )
        if len(prompts) < world_size:
            raise ValueError(
                f"task {task.name!r} has {len(prompts)} prompts for {world_size} ranks; add prompts"
            )
        if args.eval_every and not held_out_lists[i]:
            raise ValueError(f"task {task.name!r} holds out no prompts for --eval-every; add prompts")
    for task in tasks + gold:  # the reward models now: weights that cannot be fetched stop the run in seconds
        task.load()
    return tasks, prompt_lists, held_out_lists, gold


def load_model(args: Args, device, dtype: torch.dtype):
    """(pipe, lora_config, trainable parameters). The trained UNet loads and stays in fp32 (loading it in bf16
    first would round the base weights); the frozen text encoder(s) and VAE run in the inference dtype."""
    pipe = sampler.load_pipeline(args.model, device=device)
    for text_encoder in sampler.text_encoders(pipe):  # SDXL has two
        text_encoder.to(dtype)
    torch.nn.Module.to(pipe.vae, dtype)  # torch's .to: diffusers' warns of fp32 modules this VAE lacks
    unet, lora_config = pipe.unet, None
    if args.lora_rank > 0:
        from peft import LoraConfig

        lora_config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"])  # fmt: skip
        unet.add_adapter(lora_config)  # only the adapters require grad
    else:
        unet.requires_grad_(True)
    if args.gradient_checkpointing or (args.gradient_checkpointing is None and device.type == "cuda"):
        unet.enable_gradient_checkpointing()
    if args.compile:
        unet.compile()  # in place: the module, its parameter names and checkpoints stay as they are
    return pipe, lora_config, [p for p in unet.parameters() if p.requires_grad]


def claim_out(args: Args, rank: int, device):
    """Before any work: take --out (one run writes to it at a time), clear what a kill during a checkpoint
    write left, and refuse a fresh run over an earlier run's checkpoints. Every rank raises together."""
    in_use = outputs.lock(args.out) if rank == 0 else ""
    if all_mean(torch.tensor([float(bool(in_use))], device=device)).item() > 0:
        raise FileExistsError(in_use or f"{args.out} is in use by another run")
    if rank == 0:
        outputs.remove_leftovers(args.out)
    barrier()
    found = not args.resume and bool(outputs.checkpoint_iterations(args.out))
    if all_mean(torch.tensor([float(found)], device=device)).item() > 0:
        hint = "continue it with --resume latest, or pass another --out (or delete the folder)"
        raise FileExistsError(f"{args.out} holds checkpoints of an earlier run: {hint}")


def resume(run: Run) -> int:
    """The iteration to start from: the checkpoint's, with its weights, optimizer and scaler state loaded
    (prompts and noise are functions of (seed, iteration), so nothing else is needed), or 0."""
    args = run.args
    if not args.resume:
        return 0
    path = outputs.latest(args.out) if args.resume == "latest" else args.resume
    outputs.check_resumable(path, dataclasses.asdict(args), run.world_size, run.master)
    state = outputs.read_train_state(path, run.device)
    start = state["iteration"]
    if start > args.iterations:
        raise ValueError(f"--resume {path} is at iteration {start}, beyond --iterations {args.iterations}")
    if run.master:  # resuming an earlier checkpoint: the later ones of the old branch go out of latest's way
        outputs.set_aside_later_checkpoints(args.out, start)
    sampler.load_checkpoint_weights(run.pipe, path)
    if run.ema is not None:  # into the EMA's tensors: the saved EMA, or the weights in a checkpoint without
        saved = any(os.path.isdir(os.path.join(path, name)) for name in ("unet_ema", "lora_ema"))
        with outputs.weights_swapped(run.trainable, run.ema):
            sampler.load_checkpoint_weights(run.pipe, path, ema=saved)
    run.optimizer_steps = state.get("optimizer_steps", 0)
    run.optimizer.load_state_dict(state["optimizer"])  # this also restores the checkpoint's lr ...
    for group in run.optimizer.param_groups:  # ... so this run's --lr and --weight-decay go back in
        group["lr"], group["weight_decay"] = args.lr, args.weight_decay
    run.scaler.load_state_dict(state["scaler"])
    return start


def setup(args: Args) -> Run:
    """Processes, tasks, model, optimizer, resume and logging, in this order (the order fixes the RNG)."""
    sampler.check_model(args.model)  # offline with no cached copy: one line, in seconds
    device, rank, world_size, ddp = init_processes(args.dist_timeout)
    claim_out(args, rank, device)
    torch.manual_seed(args.seed)  # identical LoRA init on every rank (DDP also broadcasts rank 0's weights)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = sampler.precision_dtype(args.mixed_precision, device)
    sampler.check_precision(args.model, dtype)  # fp16 with SDXL's VAE: one line, before any weights load
    autocast = torch.autocast(device.type, dtype) if dtype != torch.float32 else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    tasks, prompt_lists, held_out_lists, gold = load_tasks(args, device, world_size)
    pipe, lora_config, trainable = load_model(args, device, dtype)
    # fused: one kernel for all parameters, not a loop of small ops (a 4x faster step on CPU, tools/bench.py)
    optimizer = torch.optim.AdamW(
        trainable, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay, fused=True
    )
    cuda_ids = [device] if device.type == "cuda" else None
    model = torch.nn.parallel.DistributedDataParallel(pipe.unet, device_ids=cuda_ids) if ddp else pipe.unet
    pretrain_data = sampler.load_pretrain_data(args.pretrain_data) if args.pretrain_data else None
    run = Run(args, device, rank, world_size, ddp, autocast, scaler, tasks, prompt_lists, pipe, model,
              lora_config, trainable, optimizer, pretrain_data)  # fmt: skip
    if args.kl_coef and lora_config is None:  # pi_ref: the base weights, frozen, in fp32 as the trained ones
        run.reference = copy.deepcopy(pipe.unet).requires_grad_(False)  # (LoRA: its adapters switched off)
    run.ema = [p.detach().clone() for p in trainable] if args.ema_decay else None
    run.held_out_lists, run.gold = held_out_lists, gold
    run.window = sampler.timestep_window(args.timestep_window, args.num_steps)
    pipe.scheduler.set_timesteps(args.num_steps)  # the T DDIM timesteps every trajectory is sampled at
    timesteps = pipe.scheduler.timesteps
    run.step_weights = sampler.step_weights(pipe.scheduler, timesteps, args.eta, args.timestep_weight)
    run.start = resume(run)
    if run.master:  # OUT/args.json, OUT/metrics.jsonl up to the start, the tracker
        run.track, run.close_tracker = outputs.open_logs(dataclasses.asdict(args), run.start)
    barrier()
    # SIGTERM (cluster preemption): finish the iteration, save and exit (checkpoint_or_stop)
    signal.signal(signal.SIGTERM, lambda *_: run.stop.fill_(1))
    return run


#### Algorithm 1, step 1: sampling ####


@dataclass
class Batch:
    """One task's samples on this rank: B = --batch-size images, T = --num-steps DDIM steps."""

    prompts: list[str]  # (B,)
    metadata: list[dict]  # (B,) the task's metadata of each prompt, plus "group": its place in the stream
    prompt_ids: torch.Tensor  # (B,) index of each prompt in the task's prompt list
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    latents: torch.Tensor  # (B, T+1, C, h, w): x_T .. x_0, float32
    log_probs: torch.Tensor  # (B, T) log p_theta_old(x_{t-1} | x_t, c) of each action, float32
    timesteps: torch.Tensor  # (T,)
    cond: dict[str, torch.Tensor]  # {name: (B, ...)} the UNet's conditioning, SD's or SDXL's (encode_prompts)


def sample_batch(run: Run, task_index: int, iteration: int, held_out: bool = False) -> Batch:
    """This rank's prompts of the task's endless stream -> stochastic DDIM trajectories with per-step
    log-probs (no grad). A minibatch reward's group of --group-size images of one prompt stays on one rank.
    held_out: the same prompts of the task's held-out split and the same noise at each call (--eval-every)."""
    args, task = run.args, run.tasks[task_index]
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)  # peak_memory_mb: of this task's iteration
    group = group_size(task, args)
    per_rank = args.batch_size // group  # prompts per rank
    place = run.rank if held_out else iteration * run.world_size + run.rank  # in the prompt stream
    first = place * per_rank
    prompt_lists = run.held_out_lists if held_out else run.prompt_lists
    items, indices = rewards.draw_prompts(prompt_lists[task_index], first, per_rank, args.seed + task_index)
    prompts = [prompt for prompt, _ in items for _ in range(group)]
    metadata = [{**meta, "group": first + i} for i, (_, meta) in enumerate(items) for _ in range(group)]
    prompt_ids = torch.tensor([index for index in indices for _ in range(group)])
    keys = (0, task_index, run.rank, 1) if held_out else (iteration, task_index, run.rank)  # held out: fixed
    generator = torch.Generator().manual_seed(rank_seed(args.seed, *keys))
    with run.autocast:
        trajectories = sampler.sample(run.pipe, prompts, args.num_steps, args.guidance, args.eta, generator)
    return Batch(prompts, metadata, prompt_ids, **trajectories)


#### Algorithm 1, step 2: advantages, batch-level as the paper (or per prompt as DDPO) ####


def global_advantages(rewards: torch.Tensor, prompt_ids: torch.Tensor, args: Args) -> torch.Tensor:
    """A = (r - mean(r)) / (std(r) + 1e-7) over the GLOBAL batch (every rank's rewards), clamped to
    [-adv_clip, adv_clip]. With --per-prompt-advantages, mean and std are those of the same prompt's rewards
    (where the prompt has at least two samples in the batch), as DDPO's per-prompt stat tracking."""
    mean = torch.full_like(rewards, rewards.mean().item())
    std = torch.full_like(rewards, rewards.std(correction=0).item())
    if args.per_prompt_advantages:
        for p in prompt_ids.unique():
            same = prompt_ids == p
            if same.sum() > 1:
                mean[same], std[same] = rewards[same].mean(), rewards[same].std(correction=0)
    return ((rewards - mean) / (std + 1e-7)).clamp(-args.adv_clip, args.adv_clip)


#### Algorithm 1, step 3: K clipped policy-gradient steps ####


def clipped_surrogate(log_prob, old_log_prob, advantages, clip_range: float, weight=1.0) -> tuple:
    """Eq. 4, the loss to minimise: mean of max(-A w, -A clip(w, 1 - eps, 1 + eps)), w = p_theta / p_theta_old
    raised to the step's --timestep-weight c_t (1: the paper). Returns it, log w and w^c_t, each (B,)."""
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(weight * log_ratio)  # log w~ = c_t log w (sampler.step_weights)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(pg_loss1, pg_loss2).mean(), log_ratio, ratio


def optimizer_step(run: Run, what: str) -> tuple[torch.Tensor, bool]:
    """Unscale the gradient (fp16), clip it to --max-grad-norm and step, or skip the step when the gradient
    is not finite. DDP averaged the gradients, so every rank sees the same norm and skips together.
    Returns the norm before clipping and whether the step was skipped."""
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, run.args.max_grad_norm)
    skipped = not torch.isfinite(grad_norm)
    if skipped:
        run.warn(f"{what}: non-finite gradient, step skipped")
        run.optimizer.zero_grad(set_to_none=True)
    else:
        for group in run.optimizer.param_groups:  # --lr-warmup: linear from lr / N to lr over N steps
            group["lr"] = run.args.lr * min(1.0, (run.optimizer_steps + 1) / max(run.args.lr_warmup, 1))
        run.scaler.step(run.optimizer)
        run.optimizer_steps += 1
        if run.ema is not None:  # ema <- ema + (1 - decay) (theta - ema)
            torch._foreach_lerp_(run.ema, [p.detach() for p in run.trainable], 1 - run.args.ema_decay)
    run.scaler.update()
    return grad_norm, skipped


STEP_STATS = ("loss", "approx_kl", "clipfrac", "ratio_error", "kl_ref", "skipped", "grad_norm")  # per step


def policy(run: Run, unet, batch: Batch, rows: slice, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pi(. | x_t, c) = N(mean, std^2 I) of `unet` at the stored states `rows` of DDIM step j."""
    cond = {name: value[rows] for name, value in batch.cond.items()}
    return sampler.step_mean(unet, run.pipe.scheduler, batch.latents[rows, j], batch.timesteps[j], cond,
                             run.args.guidance, run.args.eta)  # fmt: skip


@torch.no_grad()
def reference_mean(run: Run, batch: Batch, rows: slice, j: int) -> torch.Tensor:
    """The mean of the base policy pi_ref (--kl-coef): a frozen copy of the base UNet (full fine-tune), or
    the trained UNet with its LoRA adapters switched off (no extra memory)."""
    if run.reference is not None:
        return policy(run, run.reference, batch, rows, j)[0]
    run.pipe.unet.disable_adapters()
    try:
        return policy(run, run.pipe.unet, batch, rows, j)[0]
    finally:
        run.pipe.unet.enable_adapters()


@torch.no_grad()
def probe_log_prob(run: Run, batch: Batch, rows: slice, j: int, precision) -> torch.Tensor:
    """log p_theta of stored actions under the current weights in the given precision (autocast or fp32)."""
    with precision:
        return sampler.gaussian_log_prob(
            batch.latents[rows, j + 1], *policy(run, run.pipe.unet, batch, rows, j)
        )


def ppo_update(run: Run, batch: Batch, advantages: torch.Tensor, task_index: int, iteration: int) -> dict:
    """--train-timesteps of the --timestep-window's DDIM steps (all T by default), drawn without replacement
    (afresh for each of --inner-epochs passes); for each, ONE optimizer step of the clipped surrogate over the
    whole batch, in --micro-batch chunks. Returns {name: (K,) tensor} of STEP_STATS averaged over ranks,
    "ddim_steps" and their "timestep_weight", in training order. The UNet stays in eval mode (no dropout):
    sampling and training compute the same function, so w = 1 exactly at the first trained step."""
    args, task = run.args, run.tasks[task_index]
    step_order = np.random.default_rng([args.seed, iteration, task_index])
    ddim_steps = np.concatenate([
        run.window.start + step_order.choice(len(run.window), size=args.train_timesteps, replace=False)
        for _ in range(args.inner_epochs)
    ])  # fmt: skip
    micro = args.micro_batch or args.batch_size
    mixed, fp32 = isinstance(run.autocast, torch.autocast), contextlib.nullcontext()
    probe = slice(0, min(micro, 4))  # precision_noise: up to 4 samples of the first trained step, in fp32 too
    per_step, noise = [], None
    for k, j in enumerate(ddim_steps):
        run.optimizer.zero_grad(set_to_none=True)
        zero = torch.zeros((), device=run.device)
        stats = {"loss": zero, "approx_kl": zero, "clipfrac": zero, "ratio_error": zero, "kl_ref": zero}
        fp32_before = probe_log_prob(run, batch, probe, j, fp32) if mixed and k == 0 else None
        for m in range(0, args.batch_size, micro):
            rows = slice(m, m + micro)
            sync = m + micro >= args.batch_size or not run.ddp  # DDP averages gradients at the last chunk
            with contextlib.nullcontext() if sync else run.model.no_sync(), run.autocast:
                mean, std = policy(run, run.model, batch, rows, j)  # pi_theta under the current weights
                ref_mean = reference_mean(run, batch, rows, j) if args.kl_coef else None
            # log p_theta(x_{t-1} | x_t, c) of the stored action: (micro,)
            log_prob = sampler.gaussian_log_prob(batch.latents[rows, j + 1], mean, std)
            loss, log_ratio, ratio = clipped_surrogate(log_prob, batch.log_probs[rows, j], advantages[rows],
                                                       args.clip_range, run.step_weights[j])  # fmt: skip
            if args.kl_coef:  # + beta * KL(pi_theta || pi_ref) (0: the paper's loss)
                kl = sampler.gaussian_kl(mean, ref_mean, std)  # (micro,)
                loss = loss + args.kl_coef * kl.mean()
                stats["kl_ref"] = stats["kl_ref"] + len(kl) / args.batch_size * kl.detach().mean()
            share = len(log_ratio) / args.batch_size  # this chunk's part of the batch mean
            run.scaler.scale(loss * share).backward()
            log_ratio = log_ratio.detach()
            off = (ratio.detach() - 1).abs()  # |w - 1| of the ratio that is clipped (w^c_t)
            stats["loss"] = stats["loss"] + share * loss.detach()
            stats["approx_kl"] = stats["approx_kl"] + share * (0.5 * (log_ratio**2).mean())  # as DDPO
            stats["clipfrac"] = stats["clipfrac"] + share * (off > args.clip_range).float().mean()
            stats["ratio_error"] = torch.maximum(stats["ratio_error"], off.max())
        grad_norm, skipped = optimizer_step(run, f"iteration {iteration} {task.name}")
        if fp32_before is not None:  # the same chunk after the update, in the policy's precision and in fp32
            after, fp32_after = (probe_log_prob(run, batch, probe, j, p) for p in (run.autocast, fp32))
            noise = monitor.precision_noise(batch.log_probs[probe, j], after, fp32_before, fp32_after)
        stats["skipped"] = torch.tensor(float(skipped), device=run.device)
        stats["grad_norm"] = grad_norm.detach().float().nan_to_num(0, 0, 0)  # before clipping; 0: skipped
        per_step.append(torch.stack([stats[name] for name in STEP_STATS]))
    averaged = all_mean(torch.stack(per_step)).cpu()  # (K, len(STEP_STATS)), averaged over ranks
    per_step = {name: averaged[:, i] for i, name in enumerate(STEP_STATS) if name != "kl_ref" or args.kl_coef}
    if per_step["ratio_error"][0] > 1e-3:
        run.warn(
            f"the policy ratio before the first update is off by {per_step['ratio_error'][0]:.2e}: sampling "
            "and training disagree (eta, guidance, scheduler or precision)"
        )
    if noise is not None:
        per_step["precision_noise"] = noise = all_mean(noise).item()
        if noise > args.clip_range:
            run.warn(f"{task.name}: rounding in --mixed-precision {args.mixed_precision} moves the policy "
                     f"ratio more than --clip-range {args.clip_range:g} (precision_noise in metrics.jsonl): "
                     "clipping acts on noise (docs/training.md, 'Precision noise')")  # fmt: skip
    return {**per_step, "ddim_steps": ddim_steps, "timestep_weight": run.step_weights[ddim_steps]}


#### Algorithm 1, step 4: the pretraining loss L_pre ####


def pretrain_step(run: Run, iteration: int) -> dict:
    """One optimizer step of beta * L_pre on --pretrain-batch-size image-caption pairs per rank, after the
    iteration's RL steps (Algorithm 1). Returns its metrics line."""
    args, start = run.args, time.time()
    seed = rank_seed(args.seed, iteration, len(run.tasks), run.rank)
    side = run.pipe.unet.config.sample_size * run.pipe.vae_scale_factor  # the model's image size
    captions, arrays, sizes = sampler.read_pretrain_images(run.pretrain_data, args.pretrain_batch_size, side,
                                                           seed)  # fmt: skip
    # decided together: a rank that raised alone would leave the others waiting in a collective
    if all_mean(torch.tensor(float(not captions), device=run.device)).item() > 0:
        raise ValueError(
            f"--pretrain-data: at iteration {iteration} some rank could read none of the "
            f"{min(len(run.pretrain_data), args.pretrain_batch_size)} images it drew (see the warnings); "
            "fix or remove the broken files, then continue with --resume latest"
        )
    run.optimizer.zero_grad(set_to_none=True)
    with run.autocast:
        uncond = args.pretrain_uncond_prob
        loss = sampler.pretrain_loss(run.pipe, run.model, captions, arrays, seed, uncond, sizes)
    run.scaler.scale(args.pretrain_weight * loss).backward()
    grad_norm, skipped = optimizer_step(run, f"iteration {iteration} pretrain")
    grad_norm = 0.0 if skipped else grad_norm.item()  # of beta * L_pre before clipping, as the RL steps'
    loss = all_mean(loss.detach()).item()
    return {"iteration": iteration, "task": "pretrain", "loss": loss, "grad_norm": grad_norm,
            "skipped_steps": int(skipped), "seconds": time.time() - start}  # fmt: skip


#### Watching: held-out rewards every --eval-every iterations and the reward-hacking alarm ####


def held_out_evaluation(run: Run, iteration: int):
    """Each task's held-out prompts (the same prompts and noise each time): rows with eval_reward_mean and
    eval_<gold>_mean (--eval-rewards), eval_ema_* for the --ema-decay average, then the alarm."""
    for task_index, task in enumerate(run.tasks):
        row = {"iteration": iteration, "task": task.name, "eval_split": task.splits[-1]}
        for ema in [None, run.ema] if run.ema else [None]:  # the weights, then their EMA in their place
            with outputs.weights_swapped(run.trainable, ema) if ema else contextlib.nullcontext():
                batch = sample_batch(run, task_index, iteration, held_out=True)
            for scorer in [task, *run.gold]:  # the task's own reward is eval_reward_*
                scores = scorer.reward(batch.images, batch.prompts, batch.metadata)[0]
                name = ("eval_ema_" if ema else "eval_") + ("reward" if scorer is task else scorer.name)
                row |= monitor.summary(name, all_gather(scores.float().to(run.device)))
        run.log(row)
        if run.master:  # the alarm reads the run's rows so far
            for warning in monitor.hacking_alarm(outputs.read_metrics(run.args.out), task.name):
                run.warn(warning)


#### Checkpoints: atomic (temp folder + rename), exact resume ####


def save_checkpoint(run: Run, name: str, iteration: int):
    """OUT/name/: every rank checks that the replicas agree, rank 0 writes, everyone waits."""
    checksums = all_gather(outputs.weight_sums(run.trainable)[None]).cpu()  # (world_size, 2)
    if not checksums.isfinite().all():
        raise RuntimeError(f"non-finite weights: the update diverged; not saving {name}; lower --lr")
    if not torch.equal(checksums, checksums[:1].expand_as(checksums)):
        raise RuntimeError(f"the ranks' weights diverged (checksums {checksums.tolist()}); not saving {name}")
    if run.master:  # final/ holds what evaluate.py and diffusers load; the last checkpoint-<n> resumes
        state = {"optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict()}
        state.update(iteration=iteration, rank_checksums=checksums, optimizer_steps=run.optimizer_steps)
        run_args = {**dataclasses.asdict(run.args), "world_size": run.world_size}
        path, state = os.path.join(run.args.out, name), None if name == "final" else state
        ema = None if run.ema is None else (run.trainable, run.ema)
        outputs.write(path, run.pipe.unet, run.lora_config, state, run_args, ema)
        outputs.keep_newest(run.args.out, run.args.keep_checkpoints, keep={iteration, run.start})
    barrier()


def checkpoint_or_stop(run: Run, iteration: int) -> bool:
    """Save checkpoint-<n> every --save-every iterations, at the last one and on SIGTERM; True on SIGTERM:
    the run then ends (exit 0) and continues with --resume latest."""
    done = iteration + 1
    stopping = all_mean(run.stop.to(run.device)).item() > 0  # every rank agrees, so nobody hangs
    if done % run.args.save_every == 0 or done == run.args.iterations or stopping:
        save_checkpoint(run, f"checkpoint-{done}", done)
    if stopping and run.master:
        print(f"SIGTERM: saved checkpoint-{done}; continue with --resume latest")
    return stopping


#### Algorithm 1 ####


def main(args: Args, run: Run | None = None):
    run = run or setup(args)  # processes, tasks, model, optimizer, resume, logging
    iterations = range(run.start, args.iterations)
    bar = tqdm(iterations, initial=run.start, total=args.iterations, disable=not run.master)
    for iteration in bar:
        if args.eval_every and iteration % args.eval_every == 0:  # held-out rewards of the weights so far
            held_out_evaluation(run, iteration)
        for task_index, task in enumerate(run.tasks):  # every task in turn
            start = time.time()
            # 1. SAMPLING: trajectories with per-step log-probs, no grad
            batch = sample_batch(run, task_index, iteration)
            sampled = time.time()

            # 2. REWARDS, gathered over all ranks; batch-level advantages over the global batch
            rewards, info = task.reward(batch.images, batch.prompts, batch.metadata)  # (B,)
            global_rewards = all_gather(rewards.float().to(run.device)).cpu()  # (world_size * B,)
            if not torch.isfinite(global_rewards).all():  # every rank gathered the same: all skip together
                run.warn(f"iteration {iteration} {task.name}: non-finite rewards, update skipped")
                run.log(outputs.non_finite_rewards_row(task.name, iteration, global_rewards, args, start))
                continue
            global_prompt_ids = all_gather(batch.prompt_ids.to(run.device)).cpu()
            advantages = global_advantages(global_rewards, global_prompt_ids, args)
            advantages = advantages[run.rank * args.batch_size : (run.rank + 1) * args.batch_size]  # (B,)
            scored = time.time()

            # 3. TRAINING: K DDIM steps, one optimizer step of the clipped surrogate (Eq. 4) each
            per_step = ppo_update(run, batch, advantages.to(run.device), task_index, iteration)
            times = [start, sampled, scored, time.time()]
            row = outputs.metrics_row(task.name, iteration, global_rewards, info, per_step, times, run.device)
            run.log(row, outputs.save_samples(args, iteration, task.name, batch) if run.master else None)
            bar.set_postfix({task.name: f"{global_rewards.mean().item():.3f}"})

        # 4. L_pre: one step on image-caption data after the RL steps
        if run.pretrain_data is not None:
            run.log(pretrain_step(run, iteration))

        # 5. CHECKPOINT: atomic, every --save-every iterations; SIGTERM saves and stops here
        if checkpoint_or_stop(run, iteration):
            break
    else:  # all iterations done, no SIGTERM
        if args.eval_every:  # and the final weights
            held_out_evaluation(run, args.iterations)
        save_checkpoint(run, "final", args.iterations)
    bar.close()
    if run.master:
        run.close_tracker()
        outputs.unlock(args.out)
    if run.ddp:
        exit_distributed()  # every rank has saved and passed the barrier after it: main() does not return


if __name__ == "__main__":
    args = parse_args()
    try:
        run = setup(args)
    except (ValueError, OSError, ImportError) as error:  # the command, the files it names, a missing package
        if int(os.environ.get("RANK", 0)) == 0:
            print("train.py: error:", " ".join(str(error).split()), file=sys.stderr)  # one line, no traceback
        sys.exit(2)
    main(args, run)
