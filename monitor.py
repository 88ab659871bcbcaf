"""Watching a run: what train.py measures beside Algorithm 1 to tell whether a run learns what it should.

    precision_noise   how much of the policy ratio after an update is rounding of --mixed-precision
    hacking_alarm     a task's training reward rose while its held-out reward, or a gold reward, fell
                      (the rows of --eval-every)

Pure functions of tensors and metrics rows: train.py calls them, and they import nothing of the project.
"""

import numpy as np
import torch


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
