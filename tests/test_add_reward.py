"""The README's "Add your own reward", as a fork writes it: define a reward, register it, train on it."""

import inspect
import json
import math
import os

import rewards
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The README shows this function and the registration line below it; test_the_readme_shows_this_code keeps
# the two in sync.
def redness_reward(images, prompts, metadata):
    """images (B, 3, H, W) in [0, 1] -> rewards (B,), and metrics logged as reward_<key>."""
    red = images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))
    return red.float().cpu(), {"red": red.mean().item()}


REGISTRATION = 'TASKS["redness"] = weight_free_task("redness", redness_reward)'


def test_the_readme_shows_this_code():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert inspect.getsource(redness_reward) in readme
    assert REGISTRATION in readme


def test_a_registered_reward_trains_and_logs_its_metrics(tmp_path, monkeypatch):
    # what the README's registration line does in a fork's rewards.py, undone after the test
    monkeypatch.setitem(rewards.TASKS, "redness", rewards.weight_free_task("redness", redness_reward))
    out = str(tmp_path / "redness")
    argv = ["--model", "tiny", "--rewards", "redness", "--batch-size", "4", "--num-steps", "4",
            "--train-timesteps", "2", "--iterations", "2", "--save-every", "1", "--out", out]  # fmt: skip
    train.main(train.parse_args(argv))

    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [(row["iteration"], row["task"]) for row in rows] == [(0, "redness"), (1, "redness")]
    for row in rows:
        assert math.isfinite(row["reward_mean"]) and math.isfinite(row["loss"])
        assert math.isfinite(row["reward_red"])  # the reward's own metric, prefixed with reward_
    for name in ["checkpoint-1", "checkpoint-2", "final"]:
        assert os.path.isdir(os.path.join(out, name, "unet")), name
