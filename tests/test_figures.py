"""tools/figures.py on tiny synthetic run folders: the README's figures can always be rebuilt."""

import json

import numpy as np
from PIL import Image

from tools import figures

PROMPTS = ["a portrait of a doctor", "a portrait of a nurse"]
N = 4  # images per prompt


def fake_eval(folder, labels=("base", "toy-skin/final")):
    """An evaluate.py output folder in miniature: results.json and its 32x32 PNGs (random pixels)."""
    rng = np.random.default_rng(0)
    files, rewards = {}, {}
    for label in labels:
        files[label] = []
        for k in range(len(PROMPTS) * N):
            path = f"images/{label.replace('/', '_')}/skin_occupations/{k:05d}.png"
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / path)
            files[label].append(path)
        rewards[label] = [-0.4] * N + [-0.2] * N if label == "base" else [-0.1] * (2 * N)  # -SP per image
    scores = {
        "metric": "statistical parity",
        "lower_is_better": True,
        "rewards": rewards,
        "value": {label: {"mean": -float(np.mean(r)), "ci": [0, 1]} for label, r in rewards.items()},
    }
    results = {"sets": {"skin/occupations": {"images_per_prompt": N, "prompts": PROMPTS, "files": files,
                                             "scores": {"skin": scores}}}}  # fmt: skip
    (folder / "results.json").write_text(json.dumps(results))
    return results


def test_images_figure_shows_every_model_s_images_upscaled_pixel_for_pixel(tmp_path):
    results = fake_eval(tmp_path)
    rows = {"base": "base model", "toy-skin/final": "RL on skin"}
    figure, boxes = figures.image_figure(results, str(tmp_path), "skin/occupations", rows, 2, 3, scale=3)
    assert len(boxes) == 2 * 2 * 3  # prompts x models x images shown
    for (label, k), box in boxes.items():
        source = Image.open(tmp_path / results["sets"]["skin/occupations"]["files"][label][k]).convert("RGB")
        expected = source.resize((96, 96), Image.Resampling.NEAREST)
        assert np.array_equal(np.asarray(figure.crop(box)), np.asarray(expected)), (label, k)
    # the same pair of seeds sits in one column: base above, the fine-tuned model below
    assert boxes[("base", 1)][0] == boxes[("toy-skin/final", 1)][0]
    assert boxes[("base", 1)][1] < boxes[("toy-skin/final", 1)][1]

    out = tmp_path / "docs" / "portraits.png"
    figures.main(["images", str(tmp_path), "--row", "base=base model", "--row", "toy-skin/final=RL on skin",
                  "--prompts", "2", "--images", "3", "--scale", "3", "--out", str(out)])  # fmt: skip
    assert Image.open(out).size == figure.size


def write_metrics(folder, rows):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_curves_figure_draws_one_panel_per_task_and_one_colour_per_run(tmp_path):
    skin = [{"iteration": i, "task": "skin", "reward_mean": -0.3 + 0.05 * i} for i in range(4)]
    joint = [
        row
        for i in range(4)
        for row in (
            {"iteration": i, "task": "skin", "reward_mean": -0.3 + 0.03 * i},
            {"iteration": i, "task": "comp", "reward_mean": 0.6 + 0.02 * i},
            {"iteration": i, "task": "pretrain", "loss": 0.1},  # L_pre: no reward, not plotted
        )
    ]
    write_metrics(tmp_path / "skin", skin)
    write_metrics(tmp_path / "joint", joint)
    curves = figures.read_curves(str(tmp_path / "joint"))
    assert set(curves) == {"skin", "comp"} and curves["comp"][-1]["reward_mean"] == 0.6 + 0.02 * 3

    out = tmp_path / "curves.png"
    figures.main(["curves", f"skin={tmp_path / 'skin'}", f"joint={tmp_path / 'joint'}", "--out", str(out)])
    pixels = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3)
    colours = {tuple(p) for p in pixels}
    assert figures.COLORS[0] in colours and figures.COLORS[1] in colours  # both runs drawn
    single = figures.curves_figure({"skin": figures.read_curves(str(tmp_path / "skin"))})
    assert Image.open(out).width == 2 * single.width  # two tasks, two panels


def test_nice_ticks_cover_the_range_with_round_steps():
    ticks = figures.nice_ticks(-0.31, -0.11)
    assert ticks[0] <= -0.31 and ticks[-1] >= -0.11
    step = round(ticks[1] - ticks[0], 10)
    assert step in (0.05, 0.1) and len(ticks) <= 7


def test_curves_show_the_reward_spread_and_the_per_step_statistics(tmp_path):
    rows = [{"iteration": i, "task": "comp", "reward_mean": 0.6 + 0.02 * i, "reward_std": 0.05,
             "approx_kl_per_step": [0.0, 1e-4 * i, 2e-4 * i], "clipfrac_per_step": [0.0, 0.5, 0.9]}
            for i in range(3)]  # fmt: skip
    write_metrics(tmp_path / "a", rows)
    write_metrics(tmp_path / "b", [{**row, "reward_mean": row["reward_mean"] - 0.1} for row in rows])
    (reward,), kl, clipfrac = figures.panels_of(
        {"a": figures.read_curves(str(tmp_path / "a"))}, per_step=True
    )
    assert reward[2]["a"] == [(0, 0.6, 0.05), (1, 0.62, 0.05), (2, 0.64, 0.05)]
    assert clipfrac[0][2]["a"] == [(0, 0.0, None), (1, 0.5, None), (2, 0.9, None)]  # by trained step
    assert kl[0][2]["a"][2] == (2, 2e-4, None)  # the mean over the iterations
    out = tmp_path / "curves.png"
    figures.main(["curves", f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}", "--per-step", "--out", str(out)])
    image = Image.open(out)
    assert image.size == (300, 3 * 230 + 30)  # one task: a column of three panels, the legend under them
    pixels = {tuple(p) for p in np.asarray(image.convert("RGB")).reshape(-1, 3)}
    assert figures.COLORS[0] in pixels and figures.COLORS[1] in pixels  # both runs drawn
