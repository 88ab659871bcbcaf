"""What a train.py run writes to its --out folder and reads back, and the rules for continuing it.

    OUT/checkpoint-<iteration>/ and OUT/final/
        unet/            the trained UNet, a diffusers folder (full fine-tune), or
        lora/            the LoRA adapter (--lora-rank), as peft saves it
        train_state.pt   optimizer and grad-scaler state, the iteration, each rank's weight checksums
        args.json        the run's arguments and world_size, read back by check_resumable
    OUT/metrics.jsonl    one line per iteration and task (train.metrics_row), mirrored to TensorBoard or W&B
    OUT/samples-<iteration>-<task>.png   a grid of rank 0's samples every --sample-every iterations

A checkpoint is written to a temporary folder and renamed into place, so a crash never leaves a half-written
one under its name. train.py's loop is Algorithm 1; this file is the bookkeeping around it.
"""

import json
import os
import re
import shutil
import warnings

import numpy as np
import torch
from PIL import Image

# What fixes the prompt, noise and timestep stream and the weights' format: these must match to resume.
RUN_DEFINING = ("model", "rewards", "seed", "batch_size", "group_size", "images_per_prompt", "num_steps",
                "train_timesteps", "inner_epochs", "lora_rank", "prompt_file")  # fmt: skip
BOOKKEEPING = ("iterations", "out", "resume", "save_every", "sample_every", "log_with")


def write(path: str, unet, lora_config, train_state: dict, args: dict):
    """Write a checkpoint folder atomically: path.tmp first, then renamed to path."""
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
    torch.save(train_state, os.path.join(tmp, "train_state.pt"))
    with open(os.path.join(tmp, "args.json"), "w") as f:
        json.dump(args, f, indent=2)
    old = path + ".old"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_iterations(out: str) -> list[int]:
    """The iterations of the complete checkpoint-<n> folders in out (a write in progress, or cut short by a
    kill, is still NAME.tmp and never counts)."""
    names = os.listdir(out) if os.path.isdir(out) else []
    return sorted(int(name[11:]) for name in names if re.fullmatch(r"checkpoint-\d+", name))


def latest(out: str) -> str:
    """OUT/checkpoint-<n> with the largest n."""
    iterations = checkpoint_iterations(out)
    if not iterations:
        raise FileNotFoundError(
            f"--resume latest: {out} holds no complete checkpoint-<iteration>; a run stopped before its "
            "first checkpoint starts again with the same command without --resume"
        )
    return os.path.join(out, f"checkpoint-{iterations[-1]}")


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


def check_resumable(path: str, args: dict, world_size: int, master: bool = True):
    """Refuse to resume a checkpoint under arguments that would not continue it exactly; say which tuned
    settings (allowed: say, a lower learning rate from here on) and rank count changed."""
    if not os.path.isfile(os.path.join(path, "train_state.pt")):
        raise FileNotFoundError(f"--resume: {path} is not a train.py checkpoint (no train_state.pt)")
    with open(os.path.join(path, "args.json")) as f:
        saved = json.load(f)
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


def open_logs(out: str, config: dict, start: int, log_with: str):
    """OUT/args.json; OUT/metrics.jsonl cut back to the lines before iteration `start` (none for a fresh
    run: a resumed run logs the rest again; a line cut off by a kill has no newline and is dropped); and
    the tracker: returns open_tracker's (track, close)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "args.json"), "w") as f:
        json.dump(config, f, indent=2)
    path = os.path.join(out, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if line.endswith("\n")]
        with open(path, "w") as f:
            f.writelines(line for line in lines if start and json.loads(line)["iteration"] < start)
    return open_tracker(out, log_with, config)


def open_tracker(out: str, log_with: str, config: dict):
    """(track, close): track(row) sends a metrics row's numbers to TensorBoard or W&B; close() flushes."""

    def scalars(row):  # "comp/reward_mean": 0.61, ...
        return {f"{row['task']}/{k}": v for k, v in row.items() if isinstance(v, (int, float))}

    if log_with == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(out, "tensorboard"))

        def track(row):
            for tag, value in scalars(row).items():
                writer.add_scalar(tag, value, row["iteration"])

        return track, writer.close
    if log_with == "wandb":
        import wandb

        wandb.init(project="large-scale-rl-diffusion", config=config, dir=out)
        return lambda row: wandb.log(scalars(row), step=row["iteration"]), wandb.finish
    return lambda row: None, lambda: None


def save_grid(images: torch.Tensor, path: str, columns: int = 8):
    """images (N, 3, H, W) in [0, 1] -> one PNG, `columns` images a row."""
    n, _, h, w = images.shape
    grid = torch.zeros(3, (n + columns - 1) // columns * h, columns * w)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
