"""Which DDIM steps rule the update (issue 32): the per-step view of a run (monitor.py steps)."""

import json

import pytest
from PIL import Image

import monitor


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
