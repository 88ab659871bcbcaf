"""What a train.py run writes to its --out folder and reads back, and the rules for continuing it.

    OUT/checkpoint-<iteration>/ and OUT/final/
        unet/            the trained UNet, a diffusers folder (full fine-tune), or
        lora/            the LoRA adapter (--lora-rank) in diffusers' layout: pipe.load_lora_weights loads it
        unet_ema/, lora_ema/   the --ema-decay average of those weights, in the same layout
        train_state.pt   optimizer and grad-scaler state, the iteration, the optimizer steps taken (for
                         --lr-warmup), each rank's weight checksums
                         (checkpoints only: final/ holds the weights and args.json)
        args.json        the run's arguments and world_size, read back by check_resumable
    OUT/train.lock       the pid and host of the run that writes to OUT (lock, unlock)
    OUT/metrics.jsonl    one line per iteration and task (metrics_row), and per task at --eval-every
                         (eval_reward_mean, ...), mirrored to TensorBoard or W&B
    OUT/samples-<iteration>-<task>.png   rank 0's first 16 samples with their prompts, every --sample-every

A checkpoint is written to a temporary folder and renamed into place, so a crash never leaves a half-written
one under its name. train.py's loop is Algorithm 1; this file is the bookkeeping around it.
"""

import atexit
import contextlib
import errno
import json
import os
import re
import resource
import shutil
import socket
import textwrap
import time
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# What fixes the prompt, noise and timestep stream and the weights' format: these must match to resume.
RUN_DEFINING = ("model", "rewards", "seed", "batch_size", "group_size", "images_per_prompt", "num_steps",
                "train_timesteps", "timestep_window", "timestep_weight", "inner_epochs", "lora_rank",
                "prompt_file")  # fmt: skip
BOOKKEEPING = ("iterations", "out", "resume", "save_every", "sample_every", "log_with", "dist_timeout",
               "keep_checkpoints")  # fmt: skip


def write(path: str, unet, lora_config, train_state: dict | None, args: dict, ema: tuple | None = None):
    """Write a checkpoint folder atomically: path.tmp first, then renamed to path. Without train_state
    (final/) it holds the weights and args.json only. ema: (trained parameters, their --ema-decay average),
    written as unet_ema/ or lora_ema/ in the layout of unet/ or lora/."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_folder(tmp, unet, lora_config, train_state, args, ema)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        full = (
            getattr(error, "errno", None) == errno.ENOSPC
            or shutil.disk_usage(os.path.dirname(tmp)).free < 2**20
        )
        cause = "no space left on the device" if full else str(error).splitlines()[0]
        raise OSError(f"could not write {path} ({cause}); free room in {os.path.dirname(path)} and continue "
                      "with --resume latest") from error  # fmt: skip
    old = path + ".old"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def write_weights(folder: str, unet, lora_config, suffix: str = ""):
    """unet{suffix}/, a diffusers UNet folder, or for LoRA lora{suffix}/ in diffusers' layout."""
    if lora_config is None:
        unet.save_pretrained(os.path.join(folder, "unet" + suffix))
    else:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        # diffusers' layout, pytorch_lora_weights.safetensors: stock pipe.load_lora_weights(lora/) loads it,
        # in StableDiffusionPipeline and StableDiffusionXLPipeline alike (the same file and keys; both tested)
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(
            os.path.join(folder, "lora" + suffix), unet_lora_layers=layers
        )
        lora_config.save_pretrained(os.path.join(folder, "lora" + suffix))  # adapter_config.json


def write_folder(tmp: str, unet, lora_config, train_state: dict, args: dict, ema: tuple | None = None):
    os.makedirs(tmp)
    write_weights(tmp, unet, lora_config)
    if ema is not None:  # the same writer, with the EMA in the parameters for the moment
        with weights_swapped(*ema):
            write_weights(tmp, unet, lora_config, "_ema")
    if train_state is not None:
        torch.save(train_state, os.path.join(tmp, "train_state.pt"))
    with open(os.path.join(tmp, "args.json"), "w") as f:
        json.dump(args, f, indent=2)


def checkpoint_iterations(out: str) -> list[int]:
    """The iterations of the complete checkpoint-<n> folders in out (a write in progress, or cut short by a
    kill, is still NAME.tmp and never counts)."""
    names = os.listdir(out) if os.path.isdir(out) else []
    return sorted(int(name[11:]) for name in names if re.fullmatch(r"checkpoint-\d+", name))


def keep_newest(out: str, count: int, keep: set[int]):
    """Delete the oldest checkpoint-<n> folders beyond the `count` newest (count 0: keep all), never those of
    the iterations in `keep` (the one just written, the one this run resumed from)."""
    iterations = checkpoint_iterations(out)
    for n in iterations[: max(0, len(iterations) - count)] if count else []:
        if n not in keep:
            shutil.rmtree(os.path.join(out, f"checkpoint-{n}"))


def latest(out: str) -> str:
    """OUT/checkpoint-<n> with the largest n."""
    iterations = checkpoint_iterations(out)
    if not iterations:
        raise FileNotFoundError(
            f"--resume latest: {out} holds no complete checkpoint-<iteration>; a run stopped before its "
            "first checkpoint starts again with the same command without --resume"
        )
    return os.path.join(out, f"checkpoint-{iterations[-1]}")


def lock(out: str) -> str:
    """Take OUT/train.lock for this process (created atomically, with the owner's pid and host; released by
    unlock() or at exit). A lock whose process is dead on this host is taken over, with a warning. Returns ""
    when taken, else a one-line refusal naming the folder and its owner."""
    os.makedirs(out, exist_ok=True)
    path, me = os.path.join(out, "train.lock"), {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            with open(path, "x") as f:  # "x": O_CREAT | O_EXCL, only one process can create it
                json.dump({**me, "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
            atexit.register(unlock, out)
            return ""
        except FileExistsError:
            try:
                with open(path) as f:
                    owner = json.load(f)
            except (OSError, ValueError):  # being written by its owner this very moment
                owner = {"pid": "?", "host": "?"}
            elsewhere = owner.get("host") != me["host"]  # a shared file system: its pid means nothing here
            if elsewhere or (owner.get("pid") != me["pid"] and alive(owner.get("pid"))):
                return (f"{out} is in use by another train.py run (pid {owner.get('pid')} on "
                        f"{owner.get('host')}): wait for it or pass another --out; if that run is dead, "
                        f"delete {path}")  # fmt: skip
            if owner["pid"] != me["pid"]:
                warnings.warn(
                    f"{out}: took over the lock of pid {owner['pid']}, a run that died", stacklevel=2
                )
            os.remove(path)
    return f"{out}: could not take {path}"


def alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, TypeError, ProcessLookupError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def unlock(out: str):
    """Release OUT/train.lock if this process holds it."""
    path = os.path.join(out, "train.lock")
    try:
        with open(path) as f:
            mine = json.load(f).get("pid") == os.getpid()
    except (OSError, ValueError):
        return
    if mine:
        os.remove(path)


def set_aside_later_checkpoints(out: str, iteration: int):
    """Resuming from an earlier checkpoint starts a new branch: the old branch's later checkpoints (and its
    final/) move to OUT/abandoned-<iteration>-<time>/ with a copy of metrics.jsonl, out of --resume latest's
    way, and one line says so."""
    later = [f"checkpoint-{n}" for n in checkpoint_iterations(out) if n > iteration]
    final = os.path.join(out, "final", "args.json")
    if os.path.isfile(final):
        with open(final) as f:
            if json.load(f).get("iterations", 0) > iteration:
                later.append("final")
    if not later:
        return
    aside = os.path.join(out, f"abandoned-{iteration}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(aside)
    for name in later:
        os.replace(os.path.join(out, name), os.path.join(aside, name))
    if os.path.isfile(os.path.join(out, "metrics.jsonl")):
        shutil.copy(os.path.join(out, "metrics.jsonl"), aside)
    print(f"{out}: resuming at iteration {iteration}, the later {', '.join(later)} moved to {aside}")


def remove_leftovers(out: str):
    """Clear what a kill in the middle of write() left in out, saying so in one line each: NAME.tmp (not
    complete, or not yet renamed) is removed; NAME.old (the complete previous NAME, moved aside) goes back to
    its name when NAME is missing, and is removed when NAME is there."""
    for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        match = re.fullmatch(r"(checkpoint-\d+|final)\.(tmp|old)", name)
        if not match:
            continue
        path, kept = os.path.join(out, name), os.path.join(out, match[1])
        if match[2] == "old" and not os.path.exists(kept):
            os.replace(path, kept)
            print(f"{out}: put {name} back as {match[1]}: an interrupted checkpoint write had moved it aside")
        else:
            shutil.rmtree(path)
            print(f"{out}: removed {name}, left behind by a checkpoint write that was interrupted")


def read_train_state(path: str, device) -> dict:
    """path/train_state.pt: optimizer and scaler state, iteration (weights_only: no pickled code runs)."""
    try:
        return torch.load(os.path.join(path, "train_state.pt"), map_location=device, weights_only=True)
    except (OSError, RuntimeError, EOFError) as error:
        raise ValueError(
            f"--resume {path}: its train_state.pt cannot be read ({error}); the checkpoint is damaged: "
            "resume another one with --resume OUT/checkpoint-<n>"
        ) from None


def check_resumable(path: str, args: dict, world_size: int, master: bool = True):
    """Refuse to resume a checkpoint under arguments that would not continue it exactly; say which tuned
    settings (allowed: say, a lower learning rate from here on) and rank count changed."""
    if not os.path.isfile(os.path.join(path, "train_state.pt")):
        raise FileNotFoundError(
            f"--resume: {path} holds the trained weights only (final/ has no optimizer state): resume from "
            "the run's last checkpoint with --resume latest"
            if os.path.basename(os.path.normpath(path)) == "final"
            else f"--resume: {path} is not a train.py checkpoint (no train_state.pt)"
        )
    try:
        with open(os.path.join(path, "args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--resume {path}: its args.json cannot be read ({error}); resume another checkpoint"
        ) from None
    changes = {
        name: f"--{name.replace('_', '-')} {saved[name]!r} -> {value!r}"
        for name, value in args.items()
        if name in saved and saved[name] != value and name not in BOOKKEEPING
    }
    changed = [changes[name] for name in RUN_DEFINING if name in changes]
    if changed:
        raise ValueError(
            f"--resume {path}: the checkpoint was made with other settings ({'; '.join(changed)}); "
            "resume with the checkpoint's values (its args.json), or start a new run in another --out"
        )
    if changes and master:
        warnings.warn(
            f"--resume {path}: continuing with changed settings: {'; '.join(changes.values())}", stacklevel=3
        )
    if saved.get("world_size", world_size) != world_size and master:
        warnings.warn(
            f"--resume {path}: {saved['world_size']} ranks made the checkpoint, {world_size} continue it; "
            "the global batch and the noise change, so the run continues but not exactly as it would have",
            stacklevel=3,
        )


def open_logs(config: dict, start: int):
    """OUT/args.json; OUT/metrics.jsonl cut back to the lines before iteration `start` (none for a fresh
    run: a resumed run logs the rest again; a line cut off by a kill has no newline and is dropped); and
    the tracker: returns open_tracker's (track, close). config: the run's arguments."""
    out = config["out"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "args.json"), "w") as f:
        json.dump(config, f, indent=2)
    path = os.path.join(out, "metrics.jsonl")
    if os.path.exists(path):
        kept = []
        with open(path, errors="replace") as f:
            for number, line in enumerate(f, 1):
                try:
                    iteration = json.loads(line)["iteration"] if line.endswith("\n") else None
                except (ValueError, KeyError, TypeError):
                    raise ValueError(
                        f"{path} line {number} is not a metrics row ({line[:40]!r}); delete that line, or "
                        "move the file aside, then run again"
                    ) from None
                if start and iteration is not None and iteration < start:
                    kept.append(line)
        with open(path + ".tmp", "w") as f:  # a kill now loses no history: the rename below is atomic
            f.writelines(kept)
        os.replace(path + ".tmp", path)
    return open_tracker(out, config["log_with"], config)


def open_tracker(out: str, log_with: str, config: dict):
    """(track, close): track(row, grid=None) sends a metrics row to TensorBoard or W&B, its numbers as
    "<task>/<name>" scalars, each *_per_step list as one scalar per trained step in training order
    ("<task>/approx_kl_per_step/0" is the on-policy first step), and a sample grid (a PIL image) when given;
    close() flushes."""

    def scalars(row):  # {"comp/reward_mean": 0.61, "comp/clipfrac_per_step/1": 0.4, ...}
        named = {
            f"{row['task']}/{k}": v
            for k, v in row.items()
            if isinstance(v, (int, float)) and k != "iteration"
        }
        steps = {
            f"{row['task']}/{k}/{i}": v
            for k, vs in row.items()
            if k.endswith("_per_step")
            for i, v in enumerate(vs)
        }
        return named | steps

    if log_with == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(out, "tensorboard"))

        def track(row, grid=None):
            for tag, value in scalars(row).items():
                writer.add_scalar(tag, value, row["iteration"])
            if grid is not None:
                writer.add_image(
                    f"{row['task']}/samples", np.asarray(grid), row["iteration"], dataformats="HWC"
                )

        return track, writer.close
    if log_with == "wandb":
        import wandb

        wandb.init(project="large-scale-rl-diffusion", config=config, dir=out)

        def track(row, grid=None):
            images = {f"{row['task']}/samples": wandb.Image(grid)} if grid is not None else {}
            wandb.log(scalars(row) | images, step=row["iteration"])

        return track, wandb.finish
    return lambda row, grid=None: None, lambda: None


def sample_grid(images: torch.Tensor, captions: list[str], cell: int = 128) -> Image.Image:
    """images (N, 3, H, W) in [0, 1], each enlarged to `cell` pixels (nearest neighbour: small images keep
    their pixels) with its caption under it; as many columns as images, at most 8."""
    columns = min(len(images), 8)
    rows = -(-len(images) // columns)
    text_height = 30
    grid = Image.new("RGB", (columns * (cell + 4), rows * (cell + text_height + 4)), "white")
    draw = ImageDraw.Draw(grid)
    small = ImageFont.load_default(size=11)
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        row, column = divmod(i, columns)
        x, y = column * (cell + 4) + 2, row * (cell + text_height + 4) + 2
        pixels = (image.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)
        grid.paste(Image.fromarray(pixels).resize((cell, cell), Image.NEAREST), (x, y))
        lines = textwrap.wrap(caption, width=max(10, cell // 6))[:2]
        draw.multiline_text((x, y + cell + 2), "\n".join(lines), fill=(40, 40, 40), font=small, spacing=1)
    return grid


def metrics_row(
    task: str, iteration: int, rewards, info: dict, per_step: dict, times: list[float], device
) -> dict:
    """One OUT/metrics.jsonl line: rewards (global batch), the update's statistics (the *_per_step lists in
    training order, trained_steps naming each entry's DDIM step, 0 the noisiest) and where time went."""
    start, sampled, scored, updated = times
    row = {"iteration": iteration, "task": task, "reward_mean": rewards.mean().item(),
           "reward_std": rewards.std(correction=0).item(), "samples": len(rewards)}  # fmt: skip
    row.update({name: per_step[name].mean().item() for name in ("loss", "approx_kl", "clipfrac")})
    per_step_names = ["approx_kl", "clipfrac", "grad_norm"] + (["kl_ref"] if "kl_ref" in per_step else [])
    row.update({f"{name}_per_step": per_step[name].tolist() for name in per_step_names})
    weights = per_step.get("timestep_weight")  # c_t of --timestep-weight; none: all 1, not logged
    if weights is not None and not (weights == 1).all():
        row["timestep_weight_per_step"] = weights.tolist()
    if "kl_ref" in per_step:  # --kl-coef: KL(pi_theta || pi_ref) per trained step, before each update
        row["kl_ref"] = per_step["kl_ref"].mean().item()
    if "precision_noise" in per_step:  # --mixed-precision: rounding's part of |w - 1| (monitor.py)
        row["precision_noise"] = per_step["precision_noise"]
    row.update(
        trained_steps=per_step["ddim_steps"].tolist(),
        ratio_error_first=per_step["ratio_error"][0].item(),  # |w - 1| before the update: 0 on-policy
        skipped_steps=int(per_step["skipped"].sum().item()),
        seconds=updated - start,
        seconds_sampling=sampled - start,
        seconds_reward=scored - sampled,
        seconds_update=updated - scored,
        peak_memory_mb=torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # the process's peak RSS
    )
    return row | {f"reward_{k}": v for k, v in info.items()}


def non_finite_rewards_row(task: str, iteration: int, rewards: torch.Tensor, args, start: float) -> dict:
    """The metrics line of a task whose gathered rewards are not all finite: its update is skipped."""
    skipped = args.train_timesteps * args.inner_epochs  # every trained step of the task's update
    bad = int((~rewards.isfinite()).sum())
    return {"iteration": iteration, "task": task, "samples": len(rewards), "skipped_steps": skipped,
            "non_finite_rewards": bad, "seconds": time.time() - start}  # fmt: skip


def read_metrics(out: str) -> list[dict]:
    """The rows of OUT/metrics.jsonl, in order; a last line cut off by a kill (no newline yet) is left out."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip() and line.endswith("\n")]


def weight_sums(parameters) -> torch.Tensor:
    """(2,): sum and sum of squares of the trained weights, in float64. Gathered from every rank before a
    save: DDP keeps replicas identical, so a difference means the ranks diverged and the run must stop."""
    # One parameter at a time: a float64 copy of all weights at once would double a large model's memory.
    return sum(
        torch.stack([p.detach().double().sum(), p.detach().double().square().sum()]) for p in parameters
    )


@contextlib.contextmanager
def weights_swapped(parameters: list, values: list):
    """Inside the block the parameters hold `values` (their tensors exchanged, nothing copied), and after it
    their own again: write or load the --ema-decay average through the code that handles the weights."""
    for p, v in zip(parameters, values, strict=True):
        p.data, v.data = v.data, p.data
    try:
        yield
    finally:
        for p, v in zip(parameters, values, strict=True):
            p.data, v.data = v.data, p.data


def save_samples(args, iteration: int, task: str, batch):
    """Every --sample-every iterations: OUT/samples-<iteration>-<task>.png, the first 16 samples with their
    prompts (rank 0). Returns the grid for the tracker, or None."""
    if args.sample_every and iteration % args.sample_every == 0:
        grid = sample_grid(batch.images[:16], batch.prompts[:16])
        grid.save(os.path.join(args.out, f"samples-{iteration:05d}-{task}.png"))
        return grid
