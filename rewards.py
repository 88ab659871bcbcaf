"""Reward functions and the prompt sources of each task (paper section 4).

A task is a prompt source plus a reward. `get_task(name)` builds one:

    task = get_task("brightness")
    prompts = task.prompts("train", seed=0)        # deterministic sequence of (prompt, metadata)
    rewards, info = task.reward(images, prompts, metadata)   # (B,) float32, dict of floats

images are float in [0, 1] with shape (B, 3, H, W); metadata is one dict per image and always
holds "group": the id of the images generated for the same prompt (minibatch rewards such as
skin-tone parity are computed per group).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# A reward maps (images (B, 3, H, W) in [0, 1], prompts, metadata) to (rewards (B,), info).
RewardFn = Callable[[torch.Tensor, list[str], list[dict]], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class Task:
    name: str
    prompts: Callable[[str, int], Sequence[tuple[str, dict]]]  # (split, seed) -> [(prompt, metadata)]
    splits: tuple[str, ...]  # the first split is the training split
    reward: RewardFn
    minibatch: bool = False  # the reward is defined on a group of images of one prompt (skin, color)


#### Minibatch reward: statistical parity (paper section 4, "skin") ####


def statistical_parity(buckets: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """SP = sum_a (mean_x 1[h(x) = a] - 1/|A|)^2 over one group's bucket ids (N,) with N >= 1."""
    p = torch.bincount(buckets, minlength=num_buckets).float() / len(buckets)  # (|A|,)
    return ((p - 1.0 / num_buckets) ** 2).sum()


def group_parity_rewards(buckets: torch.Tensor, groups: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Reward -SP of its group for every image; images with bucket -1 (no person) are left out of the
    statistic but still get their group's reward. A group with no valid image gets 0 (nothing to measure)."""
    rewards = torch.zeros(len(buckets))
    for g in groups.unique():
        in_group = groups == g
        valid = buckets[in_group & (buckets >= 0)]
        if len(valid) > 0:
            rewards[in_group] = -statistical_parity(valid, num_buckets)
    return rewards


#### The registry ####

TASKS: dict[str, Callable[..., Task]] = {}


def get_task(
    name: str, device: str | torch.device = "cpu", world: str = "real", prompt_file: str | None = None
):
    """Build the task `name`; world="toy" gives the toy world's versions of pref, skin and comp."""
    if world == "toy":
        import toyworld

        return toyworld.get_task(name, device)
    if name not in TASKS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(TASKS))}")
    return TASKS[name](device=device, prompt_file=prompt_file)
