"""Watching a run: what train.py measures beside Algorithm 1 to tell whether a run learns what it should.

    precision_noise   how much of the policy ratio after an update is rounding of --mixed-precision
    hacking_alarm     a task's training reward rose while its held-out reward, or a gold reward, fell
                      (the rows of --eval-every)
    step_table        per DDIM step index: how often it was trained, its clipfrac, approx_kl and gradient
                      norm, and how often its gradient was clipped to --max-grad-norm

Pure functions of tensors and metrics rows: train.py calls them, and they import nothing of the project (the
command line uses flags.py and outputs.read_metrics). One command reads a finished or running train.py run,
prints step_table per task and draws it by thirds of the run (tools/figures.py draws the picture):

    python monitor.py steps runs/toy-skin            # the table, and runs/toy-skin/steps.png
    python monitor.py steps runs/joint --task comp --out steps-comp.png
"""

import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from flags import build_parser, option


def precision_noise(before, after, fp32_before, fp32_after) -> torch.Tensor:
    """max |w / w_fp32 - 1| over a chunk of stored actions: the policy ratio w = p_new / p_old of one
    optimizer step computed in the policy's precision (log-probs `before`, from sampling, and `after`)
    against the same ratio in fp32. 0 when rounding adds nothing; above --clip-range, clipping acts on
    rounding noise."""
    drift = (after - before) - (fp32_after - fp32_before)  # log w - log w_fp32: (micro,)
    return (torch.exp(drift) - 1).abs().max()


def summary(name: str, scores: torch.Tensor) -> dict:
    """{name_mean, name_std} of a batch of scores (std over the batch, as reward_std)."""
    return {f"{name}_mean": scores.mean().item(), f"{name}_std": scores.std(correction=0).item()}


def evaluation_points(rows: list[dict], task: str) -> list[tuple[float, dict]]:
    """(training reward, evaluation row) for each of the task's --eval-every rows that follows training: the
    training reward is the mean reward_mean of the task's training rows since the previous evaluation."""
    points, rewards = [], []
    for row in rows:
        if row.get("task") != task:
            continue
        if "eval_reward_mean" in row:
            if rewards:
                points.append((float(np.mean(rewards)), row))
            rewards = []
        elif "reward_mean" in row:
            rewards.append(row["reward_mean"])
    return points


def hacking_alarm(rows: list[dict], task: str, window: int = 3) -> list[str]:
    """Warnings when, over the task's last `window` evaluations, its training reward rose while its held-out
    reward (eval_reward_mean) or a gold reward (eval_<name>_mean, --eval-rewards) fell: the policy is
    learning the reward model's blind spots rather than what the reward stands for."""
    points = evaluation_points(rows, task)[-window:]
    if len(points) < window or not points[-1][0] > points[0][0]:
        return []
    (train_first, first), (train_last, last) = points[0], points[-1]
    watched = [key for key in last if key.startswith("eval_") and key.endswith("_mean") and key in first]
    fell = [
        key for key in watched if not key.startswith("eval_ema_") and last[key] < first[key]
    ]  # live weights
    return [
        f"possible reward hacking in {task}: over the last {window} evaluations (iterations "
        f"{first['iteration']} to {last['iteration']}) the training reward rose from {train_first:.4g} to "
        f"{train_last:.4g} while {key} fell from {first[key]:.4g} to {last[key]:.4g}"
        for key in fell
    ]


#### The per-step view: which DDIM steps rule the update ####


def training_rows(rows: list[dict], task: str) -> list[dict]:
    """The task's rows of an update (with trained_steps), in order: not L_pre, evaluation or skipped rows."""
    return [row for row in rows if row.get("task") == task and "trained_steps" in row]


def step_table(rows: list[dict], task: str, num_steps: int, max_grad_norm: float) -> list[dict]:
    """One dict per DDIM step index j of the trajectory (0: the first, noisiest step) over the task's training
    rows: `trained`, how many optimizer steps trained j; the means of its clipfrac and approx_kl; the mean and
    max of its gradient norm before clipping; `clipped`, the share of those optimizer steps whose norm was
    above max_grad_norm (clipped to it); `timestep_weight`, its c_t when the run logged one. A step never
    trained (outside --timestep-window, say) has trained 0 and None for the rest."""
    trained = {j: [] for j in range(num_steps)}  # j -> (row, k) of each time it was trained, k its place
    for row in training_rows(rows, task):
        for k, j in enumerate(row["trained_steps"]):
            trained.setdefault(j, []).append((row, k))

    def mean(values):
        return float(np.mean(values)) if values else None

    table = []
    for j in range(num_steps):
        values = {name: [row[f"{name}_per_step"][k] for row, k in trained[j] if f"{name}_per_step" in row]
                  for name in ("clipfrac", "approx_kl", "grad_norm", "timestep_weight")}  # fmt: skip
        norms = values["grad_norm"]
        table.append({"step": j, "trained": len(trained[j]), "clipfrac": mean(values["clipfrac"]),
                      "approx_kl": mean(values["approx_kl"]), "grad_norm_mean": mean(norms),
                      "grad_norm_max": max(norms) if norms else None,
                      "clipped": mean([norm > max_grad_norm for norm in norms]),
                      "timestep_weight": mean(values["timestep_weight"])})  # fmt: skip
    return table


def stretches(rows: list[dict], task: str, parts: int = 3) -> list[tuple[str, list[dict]]]:
    """The task's training rows cut into `parts` consecutive stretches of about equal length (fewer when
    there are fewer rows), each with its name: "iterations a-b", or "iteration a" for one row."""
    trained = training_rows(rows, task)
    chunks = np.array_split(np.arange(len(trained)), min(parts, len(trained))) if trained else []
    pieces = [[trained[i] for i in chunk] for chunk in chunks]
    first_last = [(piece[0]["iteration"], piece[-1]["iteration"]) for piece in pieces]
    names = [f"iteration {a}" if a == b else f"iterations {a}-{b}" for a, b in first_last]
    return list(zip(names, pieces, strict=True))


def format_step_table(table: list[dict], weighted: bool = False) -> str:
    """step_table as aligned text, one line per DDIM step ('-' for a step never trained); the c_t column
    when weighted (--timestep-weight)."""
    columns = [("step", "{:d}", "step"), ("trained", "{:d}", "trained"), ("clipfrac", "{:.3f}", "clipfrac"),
               ("approx_kl", "{:.2e}", "approx_kl"), ("grad_norm_mean", "{:.3g}", "grad norm mean"),
               ("grad_norm_max", "{:.3g}", "max"), ("clipped", "{:.0%}", "clipped")]  # fmt: skip
    columns += [("timestep_weight", "{:.3g}", "c_t")] if weighted else []
    cells = [[title for _, _, title in columns]]
    cells += [["-" if entry[key] is None else form.format(entry[key]) for key, form, _ in columns]
              for entry in table]  # fmt: skip
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
                     for line in cells)  # fmt: skip


@dataclass
class StepsArgs:
    """python monitor.py steps RUN: per DDIM step, how often it was trained, its clipfrac, approx_kl and
    gradient norm, and how often that was clipped, from RUN/metrics.jsonl and RUN/args.json."""

    task: str = option("", "only this task (default: every task of the run)")
    out: str = option("", "PNG of clipfrac and gradient norm by DDIM step, a line per third of the run's "
                          "iterations (default: RUN/steps.png)")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return
    if argv[:1] != ["steps"]:
        sys.exit("usage: python monitor.py steps RUN [--task NAME] [--out PNG]; see --help")
    run = argv[1] if len(argv) > 1 and not argv[1].startswith("-") else None
    parser = build_parser(StepsArgs, StepsArgs.__doc__)
    parser.prog = "monitor.py steps RUN"
    args = StepsArgs(**vars(parser.parse_args(argv[2:] if run else argv[1:])))  # --help ends here
    if run is None:
        parser.error("name a train.py --out folder: python monitor.py steps RUN")
    try:
        with open(os.path.join(run, "args.json")) as f:
            config = json.load(f)
        import outputs  # for the command line only: the functions above import nothing of the project

        rows = outputs.read_metrics(run)
    except (OSError, ValueError) as error:
        parser.error(f"{run} is not a readable train.py run folder ({error})")
    num_steps, max_grad_norm = config["num_steps"], config["max_grad_norm"]
    tasks = [args.task] if args.task else dict.fromkeys(row["task"] for row in rows if "trained_steps" in row)
    views = {task: stretches(rows, task) for task in tasks if training_rows(rows, task)}
    if not views:
        parser.error(f"{run}/metrics.jsonl holds no update of {args.task or 'any task'} yet")
    for task, parts in views.items():
        table = step_table(rows, task, num_steps, max_grad_norm)
        print(
            f"{task}: {sum(len(part) for _, part in parts)} updates, --max-grad-norm {max_grad_norm:g}, "
            f"--timestep-window {config.get('timestep_window', ':')}, DDIM step 0 the noisiest"
        )
        weighted = any(entry["timestep_weight"] is not None for entry in table)
        print(format_step_table(table, weighted) + "\n")
    from tools.figures import steps_figure  # PIL drawing, for the picture only

    tables = {task: [(name, step_table(part, task, num_steps, max_grad_norm)) for name, part in parts]
              for task, parts in views.items()}  # fmt: skip
    out = args.out or os.path.join(run, "steps.png")
    steps_figure(tables, max_grad_norm).save(out, optimize=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
