"""Which DDIM steps rule the update (issue 32): the per-step view of a run (monitor.py steps), training
inside a --timestep-window, and the --timestep-weight of each step's log-ratio."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import ROOT, SMALL, metrics, run, unet_weights

import monitor
import sampler
import train

BRIGHT = ["--rewards", "brightness", "--lr", "3e-3"]


def parse_error(capsys, *argv) -> str:
    """The one error line of train.py's parse_args on these flags (it exits 2)."""
    with pytest.raises(SystemExit) as stop:
        train.parse_args([*SMALL, *argv])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert stop.value.code == 2 and len(errors) == 1, errors
    return errors[0]


def test_a_window_trains_only_its_steps_and_the_default_draws_as_before(tmp_path):
    window = run(tmp_path, *BRIGHT, "--iterations", "3", "--timestep-window", "2:5", name="window")
    assert [sorted(row["trained_steps"]) for row in metrics(window)] == [[2, 3, 4]] * 3  # K = 3 of 3
    late = run(tmp_path, *BRIGHT, "--iterations", "3", "--timestep-window", "3:", "--train-timesteps", "2",
               name="late")  # fmt: skip
    assert all(set(row["trained_steps"]) <= {3, 4, 5} for row in metrics(late))
    table = monitor.step_table(metrics(late), "brightness", 6, 1.0)
    assert [entry["trained"] for entry in table[:3]] == [0, 0, 0] and sum(e["trained"] for e in table) == 6
    # the default is the whole trajectory, drawn with the same calls as before the flag existed
    whole = run(tmp_path, *BRIGHT, "--iterations", "3", name="whole")
    for row in metrics(whole):
        before = np.random.default_rng([0, row["iteration"], 0]).choice(6, size=3, replace=False)
        assert row["trained_steps"] == before.tolist()
    for out, saved in [(window, "2:5"), (late, "3:6"), (whole, "0:6")]:  # canonical LO:HI in the run's config
        with open(os.path.join(out, "args.json")) as f:
            assert json.load(f)["timestep_window"] == saved


def test_resume_with_a_window_and_weights_continues_bitwise_and_another_window_is_refused(tmp_path):
    flags = [*BRIGHT, "--timestep-window", "1:", "--timestep-weight", "sensitivity"]
    full = run(tmp_path, *flags, "--iterations", "2", name="full")
    part = run(tmp_path, *flags, "--iterations", "1", name="part")
    for changed, said in [("--timestep-window=0:4", "--timestep-window '1:6' -> '0:4'"),
                          ("--timestep-window=:", "--timestep-window '1:6' -> '0:6'"),
                          ("--timestep-weight=none", "'sensitivity' -> 'none'")]:  # fmt: skip
        argv = [*SMALL, *flags, changed, "--out", part, "--iterations", "2", "--resume", "latest"]
        with pytest.raises(ValueError, match="other settings.*" + said):
            train.main(train.parse_args(argv))
    same = ["--timestep-window", "1:6"]  # another spelling of the same window
    train.main(
        train.parse_args([*SMALL, *flags, *same, "--out", part, "--iterations", "2", "--resume", "latest"])
    )
    resumed, whole = unet_weights(os.path.join(part, "final")), unet_weights(os.path.join(full, "final"))
    assert all(torch.equal(resumed[key], value) for key, value in whole.items())
    assert [row["trained_steps"] for row in metrics(part)] == [row["trained_steps"] for row in metrics(full)]


def test_a_bad_window_fails_in_one_line_naming_the_flag_and_the_range_before_any_model_loads(
    tmp_path, capsys
):
    out = tmp_path / "never"
    command = [sys.executable, "train.py", "--model", "tiny", "--num-steps", "10",
               "--timestep-window", "8:12", "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    errors = [line for line in result.stderr.splitlines() if "train.py: error:" in line]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and "--timestep-window '8:12' must be LO:HI with 0 <= LO < HI <= 10" in errors[0]
    assert not out.exists()
    for bad in ["3:3", "5:2", "-1:4", "0:7", "a:b", "3", ""]:  # empty, reversed, outside 0:6, not LO:HI
        error = parse_error(capsys, f"--timestep-window={bad}")  # = : argparse reads -1:4 as a value
        assert f"--timestep-window '{bad}' must be LO:HI with 0 <= LO < HI <= 6" in error
    too_many = parse_error(capsys, "--timestep-window", "2:4")  # SMALL trains 3 steps
    assert (
        "--train-timesteps (3) must be between 1 and 2, the DDIM steps of --timestep-window 2:4" in too_many
    )
    assert "--train-timesteps (7) must be between 1 and 6" in parse_error(capsys, "--train-timesteps", "7")
    assert (
        train.parse_args([*SMALL, "--timestep-window", ":2", "--train-timesteps", "2"]).timestep_window
        == "0:2"
    )


def today_s_clipped_surrogate(log_prob, old_log_prob, advantages, clip_range, weight=None):
    """train.clipped_surrogate before --timestep-weight (commit 8e1ca97), with the ratio it computed for
    clipfrac returned beside it."""
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(pg_loss1, pg_loss2).mean(), log_ratio, ratio


def test_timestep_weight_none_is_today_s_loss_bit_for_bit(tmp_path, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    old, advantages = torch.randn(64, generator=generator), torch.randn(64, generator=generator)
    weights = sampler.step_weights(sampler.stable_diffusion_scheduler(), torch.arange(10), weighting="none")
    losses, grads = [], []
    for surrogate, weight in [(today_s_clipped_surrogate, None), (train.clipped_surrogate, weights[3])]:
        log_prob = (old + 0.01 * torch.randn(64, generator=torch.Generator().manual_seed(1))).requires_grad_()
        loss, log_ratio, ratio = surrogate(log_prob, old, advantages, 0.005, weight)
        loss.backward()
        losses.append((loss.detach(), log_ratio.detach(), ratio.detach()))
        grads.append(log_prob.grad)
    assert all(torch.equal(a, b) for a, b in zip(*losses, strict=True)) and torch.equal(*grads)
    # and a whole run: the same weights, losses and statistics as with today's surrogate
    ours = run(tmp_path, *BRIGHT, "--iterations", "2", "--timestep-weight", "none", name="ours")
    monkeypatch.setattr(train, "clipped_surrogate", today_s_clipped_surrogate)
    today = run(tmp_path, *BRIGHT, "--iterations", "2", name="today")
    ours_weights, today_weights = (unet_weights(os.path.join(out, "final")) for out in (ours, today))
    assert all(torch.equal(ours_weights[key], value) for key, value in today_weights.items())
    assert timeless(metrics(ours)) == timeless(metrics(today))  # no timestep_weight_per_step either


def timeless(rows):
    return [{k: v for k, v in row.items() if not k.startswith(("seconds", "peak_memory"))} for row in rows]


def test_sensitivity_weights_make_every_step_s_ratio_answer_a_change_of_the_output_alike(tmp_path):
    """The docstring of sampler.step_weights: the output moves by e = delta z along the action's noise z; the
    log-ratio of step t moves by about |k_t| / sigma_t * delta, and c_t log w_t by the same at every step."""
    scheduler = sampler.stable_diffusion_scheduler()
    scheduler.set_timesteps(10)
    weights = sampler.step_weights(scheduler, scheduler.timesteps, 1.0, "sensitivity")
    generator, delta, log_ratios = torch.Generator().manual_seed(0), 1e-4, []
    z = torch.randn(1, 4, 8, 8, generator=generator)  # the same noise at every step
    for t in scheduler.timesteps:
        x, output = torch.randn(2, 1, 4, 8, 8, generator=generator)  # any state and any prediction
        old_mean, sigma = sampler.ddim_step_mean(scheduler, output, t, x)
        new_mean = sampler.ddim_step_mean(scheduler, output + delta * z, t, x)[0]
        action = old_mean + sigma * z
        log_ratios.append(sampler.gaussian_log_prob(action, new_mean, sigma) - sampler.gaussian_log_prob(
            action, old_mean, sigma))  # fmt: skip
    log_ratios = torch.cat(log_ratios).abs()
    assert log_ratios[8] > 5 * log_ratios.median() > 4 * log_ratios[9]  # 8: 8x; 9, the least noise: 1x
    weighted = weights * log_ratios
    torch.testing.assert_close(weighted, weighted.mean().expand(10), rtol=0.01, atol=0)
    assert weights.mean().item() == pytest.approx(1.0) and weights[8] < 0.2 < 1 < weights[9]
    # on-policy (a run's first trained step) the gradient is c_t times the paper's: its norm too
    flags = [*BRIGHT, "--iterations", "1"]
    paper = metrics(run(tmp_path, *flags, name="paper"))[0]
    weighted = metrics(run(tmp_path, *flags, "--timestep-weight", "sensitivity", name="weighted"))[0]
    assert (
        weighted["trained_steps"] == paper["trained_steps"]
        and weighted["reward_mean"] == paper["reward_mean"]
    )
    tiny = sampler.load_pipeline("tiny").scheduler
    tiny.set_timesteps(6)
    c = sampler.step_weights(tiny, tiny.timesteps, 1.0, "sensitivity")[paper["trained_steps"]].tolist()
    assert weighted["timestep_weight_per_step"] == pytest.approx(c)
    assert weighted["grad_norm_per_step"][0] == pytest.approx(c[0] * paper["grad_norm_per_step"][0], rel=1e-4)


def synthetic_run(folder, extra_rows=()):
    """A run folder with a metrics.jsonl small enough to work its per-step table out by hand (T = 4)."""
    folder.mkdir()
    (folder / "args.json").write_text(
        json.dumps({"num_steps": 4, "max_grad_norm": 1.0, "timestep_window": "0:4"})
    )
    rows = [
        {"iteration": 0, "task": "skin", "trained_steps": [2, 0], "clipfrac_per_step": [0.0, 0.5],
         "approx_kl_per_step": [0.0, 0.02], "grad_norm_per_step": [3.0, 0.5]},
        {"iteration": 0, "task": "pretrain", "loss": 0.1, "grad_norm": 9.0},  # L_pre: not a DDIM step
        {"iteration": 1, "task": "skin", "trained_steps": [0, 2], "clipfrac_per_step": [0.0, 1.0],
         "approx_kl_per_step": [0.0, 0.04], "grad_norm_per_step": [0.25, 5.0]},
        {"iteration": 2, "task": "skin", "samples": 8, "skipped_steps": 2, "non_finite_rewards": 8},
        {"iteration": 2, "task": "skin", "eval_reward_mean": 0.3},  # --eval-every: no update
        {"iteration": 3, "task": "skin", "trained_steps": [2, 1], "clipfrac_per_step": [0.0, 0.25],
         "approx_kl_per_step": [0.0, 0.01], "grad_norm_per_step": [1.0, 0.75]},  # 1.0 is not clipped
        *extra_rows,
    ]  # fmt: skip
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_the_per_step_view_gives_the_table_worked_out_by_hand(tmp_path, capsys):
    comp = {"iteration": 0, "task": "comp", "trained_steps": [3], "clipfrac_per_step": [0.5],
            "approx_kl_per_step": [0.0], "grad_norm_per_step": [2.0],
            "timestep_weight_per_step": [0.25]}  # fmt: skip
    rows = synthetic_run(tmp_path / "run", [comp])
    table = monitor.step_table(rows, "skin", 4, 1.0)
    by_hand = [
        {"step": 0, "trained": 2, "clipfrac": 0.25, "approx_kl": 0.01, "grad_norm_mean": 0.375,
         "grad_norm_max": 0.5, "clipped": 0.0, "timestep_weight": None},
        {"step": 1, "trained": 1, "clipfrac": 0.25, "approx_kl": 0.01, "grad_norm_mean": 0.75,
         "grad_norm_max": 0.75, "clipped": 0.0, "timestep_weight": None},
        {"step": 2, "trained": 3, "clipfrac": 1 / 3, "approx_kl": 0.04 / 3, "grad_norm_mean": 3.0,
         "grad_norm_max": 5.0, "clipped": 2 / 3, "timestep_weight": None},
        {"step": 3, "trained": 0, "clipfrac": None, "approx_kl": None, "grad_norm_mean": None,
         "grad_norm_max": None, "clipped": None, "timestep_weight": None},
    ]  # fmt: skip
    assert table == [pytest.approx(entry) for entry in by_hand]
    comp_by_hand = {"step": 3, "trained": 1, "clipfrac": 0.5, "approx_kl": 0.0, "grad_norm_mean": 2.0,
                    "grad_norm_max": 2.0, "clipped": 1.0, "timestep_weight": 0.25}  # fmt: skip
    assert monitor.step_table(rows, "comp", 4, 1.0)[3] == comp_by_hand
    assert [(name, [row["iteration"] for row in part]) for name, part in monitor.stretches(rows, "skin")] == [
        ("iteration 0", [0]), ("iteration 1", [1]), ("iteration 3", [3])]  # fmt: skip
    assert [name for name, _ in monitor.stretches(rows, "skin", parts=2)] == ["iterations 0-1", "iteration 3"]

    monitor.main(["steps", str(tmp_path / "run")])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("skin: 3 updates, --max-grad-norm 1, --timestep-window 0:4")
    assert printed[1].split() == ["step", "trained", "clipfrac", "approx_kl", "grad", "norm", "mean", "max",
                                  "clipped"]  # fmt: skip
    assert printed[4].split() == ["2", "3", "0.333", "1.33e-02", "3", "5", "67%"]
    assert printed[5].split() == ["3", "0", "-", "-", "-", "-", "-"]
    assert "c_t" in printed[8] and printed[12].split()[-1] == "0.25"  # comp's table has the weights
    picture = Image.open(tmp_path / "run" / "steps.png")
    assert picture.size == (2 * 360, 2 * 250 + 30)  # two tasks: a row each of clipfrac and gradient norm
    monitor.main(["steps", str(tmp_path / "run"), "--task", "comp", "--out", str(tmp_path / "comp.png")])
    assert "skin" not in capsys.readouterr().out and Image.open(tmp_path / "comp.png").height == 250 + 30
    for argv in (["steps", str(tmp_path / "nothing")], ["steps", str(tmp_path / "run"), "--task", "pref"]):
        with pytest.raises(SystemExit):
            monitor.main(argv)
        assert len([line for line in capsys.readouterr().err.splitlines() if "error:" in line]) == 1
