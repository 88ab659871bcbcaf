"""evaluate.py: each metric on hand-made inputs, then an end-to-end run on the tiny model with weight-free
rewards whose results.json is recomputed from its images, and the A/B page clicked in headless chromium."""

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch

import evaluate
import rewards
import sampler

#### Metrics on hand-made inputs ####


def test_bootstrap_ci_on_known_distributions():
    assert evaluate.bootstrap_ci([0.3] * 10) == pytest.approx((0.3, 0.3))
    # two units 0 and 1: resampled means are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4 -> 95% interval [0, 1]
    assert evaluate.bootstrap_ci([0.0, 1.0], resamples=4000) == (0.0, 1.0)
    # 400 coin flips, half heads: the normal approximation gives 0.5 +- 1.96 * sqrt(0.25 / 400) = +- 0.049
    low, high = evaluate.bootstrap_ci(np.arange(400) % 2, resamples=4000, seed=1)
    assert low == pytest.approx(0.451, abs=0.01) and high == pytest.approx(0.549, abs=0.01)
    # seeded: same seed, same interval; the interval narrows with a lower confidence
    values = np.random.default_rng(0).normal(size=50)
    assert evaluate.bootstrap_ci(values, seed=3) == evaluate.bootstrap_ci(values, seed=3)
    narrow = evaluate.bootstrap_ci(values, confidence=0.5)
    wide = evaluate.bootstrap_ci(values)
    assert wide[0] < narrow[0] < values.mean() < narrow[1] < wide[1]
    with pytest.raises(ValueError, match="non-empty"):
        evaluate.bootstrap_ci([])


def test_win_rate_counts_ties_as_half_and_resamples_prompts():
    checkpoint = np.array([3.0, 1.0, 2.0, 2.0])  # images k = prompt * 2 + seed index
    base = np.array([1.0, 2.0, 2.0, 0.0])
    assert evaluate.wins(checkpoint, base).tolist() == [1.0, 0.0, 0.5, 1.0]
    result = evaluate.win_rate(checkpoint, base, images_per_prompt=2, resamples=2000)
    # prompt 0 wins 1/2, prompt 1 wins 3/4: the bootstrap over the two prompts spans exactly those
    assert result["rate"] == 0.625 and result["ties"] == 0.25 and result["pairs"] == 4
    assert result["ci"] == (0.5, 0.75)


def test_statistical_parity_metric_per_prompt_then_averaged():
    buckets = torch.tensor([0, 1, 2, 3, 0, 0, 0, 0, 0, 0, 1, 1])  # three prompts, four images each
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    reward = rewards.group_parity_rewards(buckets, groups, num_buckets=4).numpy()
    sp = evaluate.suite_metric(reward, images_per_prompt=4, parity=True)
    # balanced: 0; all one bucket: (1 - 1/4)^2 + 3 (1/4)^2 = 0.75; two buckets half each: 4 (1/4)^2 = 0.25
    assert sp.tolist() == pytest.approx([0.0, 0.75, 0.25])
    assert sp.mean() == pytest.approx(1 / 3)
    # a per-image reward: the metric is the reward's mean per prompt
    assert evaluate.suite_metric(np.array([1.0, 3.0, 5.0, 7.0]), 2, parity=False).tolist() == [2.0, 6.0]


def test_joint_gain_percent_on_the_papers_table5():
    # paper Table 5: SD2, specialist and joint values of ImageReward, detection score and SP
    assert evaluate.joint_gain_percent(0.273, 0.701, 0.783, False) == pytest.approx(83.92, abs=0.01)
    assert evaluate.joint_gain_percent(0.098, 0.182, 0.226, False) == pytest.approx(65.63, abs=0.01)
    assert evaluate.joint_gain_percent(0.567, 0.499, 0.479, True) == pytest.approx(77.27, abs=0.01)  # SP down
    assert evaluate.joint_gain_percent(0.5, 0.4, 0.7, False) == pytest.approx(
        -50.0
    )  # the joint model got worse
    assert evaluate.joint_gain_percent(0.5, 0.6, 0.5, False) is None  # the specialist did not improve


def make_checkpoint(folder, unet, rewards_trained, noise: float = 0.0, seed: int = 1):
    """A train.py-style checkpoint: the tiny UNet, each tensor perturbed by noise * its std, and args.json."""
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in unet.state_dict().values():
            if value.is_floating_point() and value.numel() > 1:
                value.add_(noise * value.std() * torch.randn(value.shape, generator=generator))
    unet.save_pretrained(os.path.join(folder, "unet"))
    unet.load_state_dict(state)
    with open(os.path.join(folder, "args.json"), "w") as f:
        json.dump({"model": "tiny", "rewards": rewards_trained}, f)
    return str(folder)


def test_checkpoint_labels_and_table5_roles_from_args_json(tmp_path):
    for name, trained in [("joint", ["brightness", "color"]), ("b", ["brightness"]), ("c", "color")]:
        os.makedirs(tmp_path / name / "final")
        with open(tmp_path / name / "final" / "args.json", "w") as f:
            json.dump({"rewards": trained}, f)
    specs = [
        str(tmp_path / "joint" / "final"),
        str(tmp_path / "b" / "final"),
        f"col={tmp_path / 'c' / 'final'}",
    ]
    checkpoints = evaluate.parse_checkpoints(specs)
    assert list(checkpoints) == ["joint/final", "b/final", "col"]
    with pytest.raises(ValueError, match="LABEL="):
        evaluate.parse_checkpoints([specs[0], specs[0]])

    args = evaluate.parse_args(["--suites", "brightness,color"])
    assert evaluate.table5_roles(args, checkpoints) == (
        ["joint/final"],
        {"brightness": ["b/final"], "color": ["col"]},
    )
    args = evaluate.parse_args(
        ["--suites", "brightness,color", "--joint", "col", "--specialist", "color=b/final"]
    )
    assert evaluate.table5_roles(args, checkpoints) == (["col"], {"color": ["b/final"]})
    args = evaluate.parse_args(["--suites", "brightness"])  # one evaluated reward: no joint model
    assert evaluate.table5_roles(args, checkpoints) == ([], {})
    # several seeds' runs: run i's joint model against run i's specialists
    args = evaluate.parse_args(
        ["--suites", "brightness,color", "--joint", "joint/final,col", "--specialist", "color=b/final,col"]
    )
    assert evaluate.table5_roles(args, checkpoints) == (["joint/final", "col"], {"color": ["b/final", "col"]})
    # two specialist runs, but one joint model (read from args.json): refused as the flags are read (the
    # message is in test_bad_input_is_a_clear_error_before_any_model_loads)
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--suites", "brightness,color", "--specialist", "color=b/final,col"])


def test_bad_input_is_a_clear_error_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """Refused by parse_args, before a model is loaded or an image generated, each saying what to change."""
    cases = [
        (
            ["--pref-rewards", "pref,nope"],
            "unknown reward 'nope' in --pref-rewards; known rewards: aesthetic",
        ),
        (["--pref-rewards", " , "], "--pref-rewards needs at least one reward"),
        (["--specialist", "skin"], "--specialist 'skin' must be SUITE=LABEL"),
        (["--specialist", "skin="], "must be SUITE=LABEL"),
        (["--specialist", "skin=a,"], "must be SUITE=LABEL"),
        (["--joint", "j0,"], "--joint 'j0,' must be a --checkpoint label"),
        (["--joint", "j0,j1"], "--joint 'j0,j1' names 2 runs: name each suite's specialists the same way"),
        (
            ["--joint", "j0,j1", "--specialist", "skin=s0"],
            "--specialist 'skin=s0' names 1 run(s) but --joint 'j0,j1' names 2",
        ),
        (
            ["--specialist", "skin=s0,s1"],
            "--specialist 'skin=s0,s1' names 2 run(s) but without --joint there is 1",
        ),
        (["--resamples", "0"], "--resamples must be >= 1"),
        (
            ["--model", "toy", "--pref-prompts", "parti=parti.txt"],
            "drop --pref-prompts with a toy-world --model",
        ),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit):
            evaluate.parse_args(argv)
        assert message in capsys.readouterr().err, argv
    # a prompt file goes to the weight-free suites of the toy world, not to its own pref, skin and comp
    lines = [f"a red circle {i}" for i in range(20)]  # 10% held out: 2 test prompts
    (tmp_path / "prompts.txt").write_text("\n".join(lines))
    args = evaluate.parse_args(
        ["--model", "toy", "--suites", "pref", "--prompt-file", str(tmp_path / "prompts.txt")]
    )
    with pytest.raises(
        ValueError, match="task pref of the toy world builds its own prompts.*drop --prompt-file"
    ):
        evaluate.build_prompt_sets(args)
    args = evaluate.parse_args(
        ["--model", "toy", "--suites", "brightness", "--prompt-file", str(tmp_path / "prompts.txt")]
    )
    assert {p for ps in evaluate.build_prompt_sets(args) for p in ps.prompts} <= set(lines)
    # a scorer that cannot be fetched (offline, no cached copy) stops the run before any generation
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(evaluate, "generate_images", lambda *a: pytest.fail("generated before the check"))
    args = evaluate.parse_args(["--model", "tiny", "--suites", "pref", "--pref-rewards", "imagereward",
                                "--prompt-file", str(tmp_path / "prompts.txt")])  # fmt: skip
    with pytest.raises(OSError, match="reward model.*--model toy"):
        evaluate.evaluate(args)


def test_tally_of_two_raters(tmp_path, capsys):
    def vote(pair, set_name, winner):
        return {
            "pair": pair,
            "set": set_name,
            "seed": 0,
            "checkpoint": "ft",
            "side": "left",
            "winner": winner,
        }

    rater1 = [vote("a", "db", "checkpoint"), vote("b", "db", "checkpoint"), vote("c", "parti", "base")]
    rater2 = [vote("a", "db", "base"), vote("b", "db", "checkpoint")]
    for i, votes in enumerate([rater1, rater2]):
        with open(tmp_path / f"votes{i}.json", "w") as f:
            json.dump({"page": "x", "votes": votes}, f)
    rows = evaluate.tally([str(tmp_path / "votes0.json"), str(tmp_path / "votes1.json")], resamples=2000)
    by_set = {r["set"]: r for r in rows}
    # pair a: 1 of 2 raters for the checkpoint, pair b: 2 of 2, pair c: 0 of 1
    assert by_set["db"]["rate"] == 0.75 and by_set["db"]["votes"] == 4 and by_set["db"]["pairs"] == 2
    assert by_set["parti"]["rate"] == 0.0 and by_set["all"]["rate"] == pytest.approx(0.5)
    assert by_set["db"]["ci"] == (0.5, 1.0)
    evaluate.main(["--tally", str(tmp_path / "votes0.json"), str(tmp_path / "votes1.json")])
    assert "| ft | all | 5 | 3 | 50.0% |" in capsys.readouterr().out


#### End to end: tiny model, weight-free rewards ####

# few prompts, images and steps: seconds on a CPU
RUN = (
    "--model tiny --suites brightness,jpeg,color --num-steps 2 --max-prompts 2 --images-per-prompt 2 "
    "--group-size 3 --batch-size 4 --resamples 500 --seed 5"
).split()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Base, a perturbed "joint" checkpoint, a differently perturbed brightness specialist and an unchanged
    copy of the base UNet as color "specialist"; evaluated once for all the tests below."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine one thread is faster for a model this small
    root = tmp_path_factory.mktemp("evaluate")
    unet = sampler.load_pipeline("tiny").unet
    checkpoints = {
        "joint": make_checkpoint(root / "joint", unet, ["brightness", "color"], noise=0.1, seed=1),
        "bright": make_checkpoint(root / "bright", unet, ["brightness"], noise=0.1, seed=2),
        "same": make_checkpoint(root / "same", unet, ["color"]),
    }
    out = str(root / "out")
    argv = [
        *RUN,
        "--out",
        out,
        "--joint",
        "joint",
        "--specialist",
        "brightness=bright",
        "--specialist",
        "color=same",
    ]
    argv += [arg for label, path in checkpoints.items() for arg in ("--checkpoint", f"{label}={path}")]
    evaluate.main(argv)
    yield {"out": out, "argv": argv, "checkpoints": checkpoints}
    torch.set_num_threads(threads)


def load_results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def test_run_writes_every_output(run):
    out = run["out"]
    results = load_results(out)
    assert list(results["sets"]) == ["brightness/test", "jpeg/test", "color/test"]
    report = open(os.path.join(out, "results.md")).read()
    for text in [
        "## brightness",
        "## color: colour parity (SP) (lower is better",
        "## Win rate against base",
        "## Joint training (paper Table 5)",
        "100 * (joint - base) / (specialist - base)",
    ]:
        assert text in report
    for set_name, r in results["sets"].items():  # each set's own prompt count
        assert f"{set_name}: {len(r['prompts'])} prompts" in report
    for set_name in results["sets"]:
        grids = os.listdir(os.path.join(out, "grids", evaluate.safe_name(set_name)))
        assert sorted(grids) == ["0000.png", "0001.png"]
    page = open(os.path.join(out, "ab.html")).read()
    assert "Left is better" in page and "Right is better" in page


def test_results_match_a_recomputation_from_the_images(run):
    out = run["out"]
    results = load_results(out)
    for set_name, r in results["sets"].items():
        suite, n = r["suite"], r["images_per_prompt"]
        task = rewards.get_task(suite)
        scored = r["scores"][suite]
        for label, paths in r["files"].items():
            images = evaluate.load_images(out, paths)
            prompts = [p for p in r["prompts"] for _ in range(n)]
            metadata = [{"group": k // n} for k in range(len(paths))]
            expected, _ = task.reward(images, prompts, metadata)
            assert scored["rewards"][label] == pytest.approx(expected.tolist(), abs=1e-6), (set_name, label)
            metric = -expected.numpy() if suite == "color" else expected.numpy()  # color's metric is SP
            assert scored["value"][label]["mean"] == pytest.approx(metric.mean(), abs=1e-6)
            low, high = scored["value"][label]["ci"]
            assert low <= scored["value"][label]["mean"] <= high
        base = np.array(scored["rewards"]["base"])
        for label in run["checkpoints"]:
            mine = np.array(scored["rewards"][label])
            expected_rate = np.mean((mine > base) + 0.5 * (mine == base))
            assert r["win_rate"][label]["rate"] == pytest.approx(expected_rate)
            assert r["win_rate"][label]["pairs"] == len(base)

    rows = {row["set"]: row for row in results["table5"]["rows"]}
    assert set(rows) == {"brightness/test", "color/test"}
    v = rows["brightness/test"]["value"]
    expected = evaluate.joint_gain_percent(v["base"], v["joint"], v["bright"], lower_is_better=False)
    assert rows["brightness/test"]["joint_percent"] == [expected]
    assert rows["color/test"]["lower_is_better"] and rows["color/test"]["specialist"] == ["same"]
    assert "mean" not in rows["color/test"]  # one run: no seed means


def test_table5_over_several_runs_compares_run_by_run_and_the_means(run):
    """Two "seeds" from the fixture's models: run 0 is (joint, bright), run 1 is (same, joint)."""
    results = load_results(run["out"])
    rows = evaluate.table5(results, ["joint", "same"], {"brightness": ["bright", "joint"]})
    assert [row["set"] for row in rows] == ["brightness/test"]
    row = rows[0]
    v = row["value"]
    assert row["joint_percent"] == [
        evaluate.joint_gain_percent(v["base"], v["joint"], v["bright"], False),
        evaluate.joint_gain_percent(v["base"], v["same"], v["joint"], False),
    ]
    joint_mean, specialist_mean = (v["joint"] + v["same"]) / 2, (v["bright"] + v["joint"]) / 2
    assert row["mean"]["joint"] == pytest.approx(joint_mean)
    assert row["mean"]["specialist"] == pytest.approx(specialist_mean)
    assert row["mean"]["joint_percent"] == evaluate.joint_gain_percent(
        v["base"], row["mean"]["joint"], row["mean"]["specialist"], False
    )
    results["table5"] = {"joint": ["joint", "same"], "specialists": {"brightness": ["bright", "joint"]},
                         "rows": rows}  # fmt: skip
    report = evaluate.markdown_report(results)
    for text in [
        "Joint models (one per run) `joint`, `same`; specialists: brightness `bright`, `joint`.",
        "| joint, % of specialist gain | ",
        "| same, % of specialist gain | ",
        f"| mean of the 2 specialists | {specialist_mean:.3f} |",
        f"| mean of the 2 joint models | {joint_mean:.3f} |",
        "| mean joint, % of mean specialist gain | ",
    ]:
        assert text in report, text


def test_paired_images_share_their_seed(run):
    """Image k of every model is image k of its own model sampled alone from seed --seed + k."""
    out = run["out"]
    results = load_results(out)
    r = results["sets"]["color/test"]
    n = r["images_per_prompt"]
    assert r["seeds"] == [5 + k for k in range(len(r["files"]["base"]))]
    for label, checkpoint in [("base", None), ("joint", run["checkpoints"]["joint"])]:
        pipe = sampler.load_pipeline("tiny", checkpoint=checkpoint)
        for k in (0, 4):
            generator = [torch.Generator().manual_seed(r["seeds"][k])]
            alone = sampler.sample(pipe, [r["prompts"][k // n]], num_steps=2, generator=generator)["images"]
            saved = evaluate.load_images(out, [r["files"][label][k]])
            assert (alone - saved).abs().max() <= 1.5 / 255, (label, k)
    # an unchanged copy of the base UNet reproduces the base images exactly: every pair is a tie
    for r in results["sets"].values():
        same = evaluate.load_images(out, r["files"]["same"])
        assert torch.equal(same, evaluate.load_images(out, r["files"]["base"]))
        assert r["win_rate"]["same"]["rate"] == 0.5 and r["win_rate"]["same"]["ties"] == 1.0
    # the perturbed checkpoint does change its images
    joint = evaluate.load_images(out, results["sets"]["brightness/test"]["files"]["joint"])
    assert not torch.equal(
        joint, evaluate.load_images(out, results["sets"]["brightness/test"]["files"]["base"])
    )


def test_rerun_reuses_the_images(run, monkeypatch):
    def no_generation(*args, **kwargs):
        raise AssertionError("a rerun with the same settings must not load a model")

    before = load_results(run["out"])
    monkeypatch.setattr(sampler, "load_pipeline", no_generation)
    evaluate.main(run["argv"])
    after = load_results(run["out"])
    assert after["sets"] == before["sets"]


def test_a_changed_local_model_folder_gets_new_images(tmp_path):
    """The base model of a local folder is keyed by its files, as a checkpoint is: after its weights change
    (a re-pretrained toy model, say), a rerun into the same --out generates and scores new base images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = sampler.load_pipeline("tiny")
        model = str(tmp_path / "model")
        pipe.save_pretrained(model)
        argv = [*RUN, "--suites", "brightness", "--model", model, "--out", str(tmp_path / "out")]  # last wins
        evaluate.main(argv)
        before = load_results(str(tmp_path / "out"))["sets"]["brightness/test"]
        with torch.no_grad():  # new weights, as after pretraining again
            for value in pipe.unet.parameters():
                value.mul_(1.5)
        pipe.save_pretrained(model)
        evaluate.main(argv)
        after = load_results(str(tmp_path / "out"))["sets"]["brightness/test"]
    finally:
        torch.set_num_threads(threads)
    assert after["files"]["base"] != before["files"]["base"]
    assert (
        after["scores"]["brightness"]["rewards"]["base"] != before["scores"]["brightness"]["rewards"]["base"]
    )
    assert evaluate.model_fingerprint("tiny") == "tiny"
    assert (
        evaluate.model_fingerprint("stabilityai/stable-diffusion-2-base")
        == "stabilityai/stable-diffusion-2-base"
    )
    if os.path.isdir(sampler.TOY_MODEL_DIR):  # "toy" is the folder data/toy-model
        assert evaluate.model_fingerprint("toy") == [
            "toy",
            evaluate.checkpoint_fingerprint(sampler.TOY_MODEL_DIR),
        ]


#### The A/B page in a real headless browser ####


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(
    find_chromium() is None or shutil.which("chromedriver") is None,
    reason="needs chromium and chromedriver: apt-get install -y chromium chromium-driver",
)
def test_ab_page_in_headless_chromium(run, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install selenium")
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = find_chromium()
    for flag in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]:
        options.add_argument(flag)
    downloads = tmp_path / "downloads"
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads)})
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))  # no driver download
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.execute_cdp_cmd(
            "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
        )
        driver.get("file://" + os.path.join(run["out"], "ab.html"))
        pairs = driver.execute_script("return PAIRS")
        assert driver.find_element(By.ID, "progress").text == f"pair 1 of {len(pairs)}"
        clicks = ["left", "right", "left", "left"]
        for i, side in enumerate(clicks):
            assert driver.find_element(By.ID, "prompt").text == pairs[i]["prompt"]
            for image in ("left-image", "right-image"):  # the relative image paths resolve
                assert driver.execute_script(f"return document.getElementById('{image}').naturalWidth") == 32
            driver.find_element(By.ID, side).click()
        assert driver.find_element(By.ID, "progress").text == f"pair 5 of {len(pairs)}"
        driver.find_element(By.ID, "download").click()
        votes_path = downloads / "votes.json"
        deadline = time.time() + 10
        while not votes_path.exists() and time.time() < deadline:
            time.sleep(0.1)
        with open(votes_path) as f:
            votes = json.load(f)["votes"]
    finally:
        driver.quit()

    assert [v["side"] for v in votes] == clicks
    for vote, pair, side in zip(votes, pairs, clicks, strict=False):
        assert vote["pair"] == pair["id"] and vote["winner"] == pair[f"{side}_model"]
    rows = evaluate.tally([str(votes_path)], resamples=500)
    overall = next(r for r in rows if r["set"] == "all" and r["checkpoint"] == votes[0]["checkpoint"])
    mine = [v for v in votes if v["checkpoint"] == votes[0]["checkpoint"]]
    assert overall["rate"] == pytest.approx(np.mean([v["winner"] == "checkpoint" for v in mine]))
