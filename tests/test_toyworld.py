"""The toy world: exact detectors on rendered scenes, the toy tasks' contracts, the tokenizer, the
export format, and the committed toy model loading offline and sampling."""

import json
import os

import numpy as np
import pytest
import torch

import rewards
import sampler
import toyworld as tw


def render(scenes: list[dict], seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.stack([torch.from_numpy(tw.render(s, rng)).permute(2, 0, 1) for s in scenes])


def objects_scene(objects, relation="next to", fade=0.0) -> dict:
    return {"kind": "objects", "objects": [tuple(o) for o in objects], "relation": relation, "fade": fade}


def figure_scene(occupation="doctor", tone=0, fade=0.0) -> dict:
    return {"kind": "figure", "occupation": occupation, "template": "a {}", "tone": tone, "fade": fade}


def test_detect_objects_is_exact_on_rendered_scenes():
    rng = np.random.default_rng(0)
    scenes = [s for s in (tw.sample_scene(rng) for _ in range(300)) if s["kind"] == "objects"]
    for s in scenes:
        s["fade"] = 0.0
    conf = tw.detect_objects(render(scenes))  # (B, 6, 5)
    expected = torch.zeros_like(conf)
    for i, s in enumerate(scenes):
        for colour, shape in s["objects"]:
            expected[i, list(tw.COLOURS).index(colour), tw.TEMPLATES.index(shape)] = 1
    assert torch.equal(conf[:, :, : len(tw.SHAPES)], expected[:, :, : len(tw.SHAPES)])


def test_detectors_on_people_and_faded_scenes():
    people = [figure_scene(o, tone) for o in tw.OCCUPATIONS for tone in range(4)]
    images = render(people)
    assert tw.detect_tone(images).tolist() == [tone for _ in tw.OCCUPATIONS for tone in range(4)]
    for fade in (*tw.FADE_RANGE, sum(tw.FADE_RANGE) / 2):  # faded heads keep their tone, yellow hats are none
        faded_people = render([figure_scene(o, tone, fade) for o in tw.OCCUPATIONS for tone in range(4)])
        assert tw.detect_tone(faded_people).tolist() == [tone for _ in tw.OCCUPATIONS for tone in range(4)]
    rng = np.random.default_rng(1)
    scenes = [s for s in (tw.sample_scene(rng) for _ in range(400)) if s["kind"] == "objects"]
    assert (tw.detect_tone(render(scenes)) == -1).all()  # faded or not, shapes are nobody
    outfit = [list(tw.COLOURS).index(tw.OCCUPATIONS[s["occupation"]][0]) for s in people]
    assert torch.equal(tw.detect_objects(images)[range(len(people)), outfit, -1], torch.ones(len(people)))

    shapes = render([objects_scene([("white", "circle"), ("yellow", "square")])])
    assert tw.detect_tone(shapes).tolist() == [-1]  # no person
    clean = render([objects_scene([("red", "cross")]), figure_scene()])
    faded = render([objects_scene([("red", "cross")], fade=0.5), figure_scene(fade=0.5)])
    assert torch.equal(tw.palette_fit(clean), torch.ones(2))
    assert (tw.palette_fit(faded) < 0.8).all()
    washed_out = render([objects_scene([("red", "cross")], fade=0.6)])  # less than half red: not detected
    assert tw.object_scores(washed_out, [[("red", "cross")]]).item() == 0


def test_what_is_absent_is_not_detected():
    canvases = torch.stack([torch.tensor(c).view(3, 1, 1).expand(3, 32, 32) for c in tw.COLOURS.values()])
    assert torch.equal(tw.detect_objects(canvases), torch.zeros(len(tw.COLOURS), len(tw.COLOURS), 5))
    assert (tw.detect_tone(canvases) == -1).all()
    # a person's hat is no shape: nothing but the outfit's body is detected in a portrait
    people = render([figure_scene(o, tone) for o in tw.OCCUPATIONS for tone in range(4)])
    conf = tw.detect_objects(people)
    outfit = [list(tw.COLOURS).index(tw.OCCUPATIONS[o][0]) for o in tw.OCCUPATIONS for _ in range(4)]
    conf[range(len(outfit)), outfit, -1] = 0
    assert conf.max() < 0.5


def test_pretraining_data_is_biased():
    rng = np.random.default_rng(0)
    scenes = [tw.sample_scene(rng) for _ in range(4000)]
    kinds = {
        k: sum(s["kind"] == "figure" if k == "figure" else len(s.get("objects", ())) == k for s in scenes)
        for k in ("figure", 1, 2)
    }
    assert kinds[1] > 1.5 * kinds[2] > 0
    tones = np.bincount([s["tone"] for s in scenes if s["kind"] == "figure"], minlength=4) / kinds["figure"]
    np.testing.assert_allclose(tones, tw.TONE_BIAS, atol=0.03)
    # `pretrain --two-objects` moves scenes between one and two objects, leaving people as they are
    rng = np.random.default_rng(0)
    rarer = [tw.sample_scene(rng, two_objects=0.03) for _ in range(4000)]
    assert abs(sum(len(s.get("objects", ())) == 2 for s in rarer) / 4000 - 0.03) < 0.01
    assert abs(sum(s["kind"] == "figure" for s in rarer) / 4000 - tw.SCENE_MIX["figure"]) < 0.03
    with pytest.raises(ValueError, match="--two-objects must be a share between 0 and 0.55"):
        tw.pretrain(tw.PretrainArgs(out="unused", two_objects=0.6))


def test_tasks_follow_the_rewards_contract():
    comp, skin, pref = (tw.load_task(name, "toy") for name in ("comp", "skin", "pref"))
    assert comp.splits == ("train", "seen", "unseen") and skin.splits == ("train", "occupations")
    assert pref.splits == ("train", "test") and skin.minibatch and not comp.minibatch
    assert comp.prompts("train", 3) == comp.prompts("train", 3) != comp.prompts("train", 4)
    trained = {tuple(o) for _, m in comp.prompts("train", 0) for o in m["objects"]}
    unseen = {tuple(o) for _, m in comp.prompts("unseen", 0) for o in m["objects"]}
    assert not trained & unseen and unseen == set(tw.UNSEEN_OBJECTS)
    assert not {p for p, _ in comp.prompts("train", 0)} & {p for p, _ in comp.prompts("seen", 0)}
    assert {p for p, _ in skin.prompts("occupations", 0)} == {f"a portrait of a {o}" for o in tw.OCCUPATIONS}
    assert not {p for p, _ in pref.prompts("train", 0)} & {p for p, _ in pref.prompts("test", 0)}
    # the other tasks' held-out prompts stay held out from pref (and so from joint models)
    held_out = {p for s in ("seen", "unseen") for p, _ in comp.prompts(s, 0)}
    held_out |= {p for p, _ in skin.prompts("occupations", 0)}
    for split in ("train", "test"):
        items = pref.prompts(split, 0)
        assert not {p for p, _ in items} & held_out
        assert not {tuple(o) for _, m in items for o in m.get("objects", ())} & set(tw.UNSEEN_OBJECTS)
        assert {len(m.get("objects", ())) for _, m in items} == {0, 1, 2}  # portraits, one and two objects

    items = comp.prompts("unseen", 0)[:4]
    scenes = [objects_scene(m["objects"]) for _, m in items]
    images = torch.cat([render(scenes), torch.full((1, 3, 32, 32), 0.5)])
    metadata = [{**m, "group": i} for i, (_, m) in enumerate(items + items[:1])]
    reward, info = comp.reward(images, [p for p, _ in items + items[:1]], metadata)
    assert reward.dtype == torch.float32 and reward.tolist() == [1, 1, 1, 1, 0]

    tones = [0, 1, 2, 3, 3, 3, 3, 3]  # group 0: all four tones (SP 0); group 1: all light
    images = render([figure_scene(tone=t) for t in tones] + [objects_scene([("red", "circle")])])
    groups = [0] * 4 + [1] * 5  # the shapes image joins group 1 but has no person
    metadata = [{"occupation": "doctor", "group": g} for g in groups]
    reward, info = skin.reward(images, ["a doctor"] * 9, metadata)
    expected = rewards.group_parity_rewards(torch.tensor([*tones, -1]), torch.tensor(groups), 4)
    assert (
        torch.equal(reward, expected)
        and reward[0] == 0
        and reward[4] == -0.75
        and info["no_person"] == pytest.approx(1 / 9)
    )

    images = render([figure_scene("teacher"), figure_scene("teacher", fade=0.5), figure_scene("doctor")])
    metadata = [{"occupation": "teacher", "group": i} for i in range(3)]
    reward, info = pref.reward(images, ["a teacher"] * 3, metadata)
    assert reward[0] == 1 and reward[0] > reward[1] and reward[0] > reward[2]


def test_comp_all_detected_needs_every_object_of_the_prompt():
    """all_detected is the share of images with every object of the prompt detected (confidence > 0.5), not
    of images whose mean confidence is above one half."""
    comp = tw.load_task("comp", "toy")
    pair = [["red", "circle"], ["blue", "cross"]]
    images = render([objects_scene(pair), objects_scene(pair[:1]), objects_scene([("yellow", "square")])])
    cut = images[0].clone()  # the pair with the top 6 of the cross's 11 rows erased: a weak cross
    cross = (cut - torch.tensor(tw.COLOURS["blue"])[:, None, None]).abs().sum(0) < 0.05  # (H, W)
    cross[cross.nonzero()[:, 0].min() + 6 :] = False
    cut[:, cross] = torch.tensor(tw.BACKGROUND)[:, None]
    images = torch.cat([images, cut[None]])
    metadata = [{"objects": pair, "group": i} for i in range(4)]
    reward, _ = comp.reward(images, ["a red circle next to a blue cross"] * 4, metadata)
    circle, weak_cross = (tw.object_scores(cut[None], [[o]]).item() for o in pair)
    assert circle == 1 and 0 < weak_cross < 0.5 and reward[3] > 0.5
    assert reward[:3].tolist() == [1.0, 0.5, 0.0]
    # both present, only the circle, neither, a weak cross
    for i, expected in enumerate([1.0, 0.0, 0.0, 0.0]):
        _, info = comp.reward(images[i : i + 1], [""], metadata[i : i + 1])
        assert info["all_detected"] == expected, i
    _, info = comp.reward(images, [""] * 4, metadata)
    assert info["all_detected"] == 0.25


def test_toy_tasks_refuse_a_prompt_file():
    for name in tw.TASKS:
        with pytest.raises(
            ValueError, match=f"task {name} of the toy world builds its own prompts.*--prompt-file"
        ):
            tw.load_task(name, "toy", prompt_file="prompts.txt")
    assert tw.load_task("brightness", "toy", prompt_file="prompts.txt").name == "brightness"


def test_tokenizer_has_every_word_as_one_token():
    tokenizer = tw.build_tokenizer()
    for word in tw.vocabulary():
        assert len(tokenizer(word).input_ids) == 3, word
    rng = np.random.default_rng(0)
    longest = max((tw.caption(tw.sample_scene(rng)) for _ in range(2000)), key=lambda c: len(c.split()))
    assert len(tokenizer(longest).input_ids) <= tw.MAX_TOKENS


def test_export_writes_an_imagefolder(tmp_path):
    from PIL import Image

    tw.export(str(tmp_path), n=5, seed=0)
    lines = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert [line["file_name"] for line in lines] == [f"{i:05d}.png" for i in range(5)]
    assert Image.open(tmp_path / "00000.png").size == (32, 32) and all(line["text"] for line in lines)


def test_command_line_runs_a_command_and_refuses_an_unknown_one(tmp_path, capsys):
    tw.main(["export", "--out", str(tmp_path), "--n", "3", "--seed", "2", "--unfaded"])
    texts = [json.loads(line)["text"] for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert texts == tw.make_dataset(3, seed=2, unfaded=True)[1]
    for argv, message in [([], "(no command)"), (["nope"], "(unknown command 'nope')")]:
        with pytest.raises(SystemExit, match=r"usage: python toyworld.py \{pretrain,export,report\}") as exit:
            tw.main(argv)
        assert message in str(exit.value)
    with pytest.raises(SystemExit):
        tw.main(["report", "--help"])
    assert "--num-steps NUM_STEPS" in capsys.readouterr().out


def test_unfaded_export_leaves_out_the_faded_scenes_only():
    def fits(images):  # palette_fit of uint8 (n, 32, 32, 3) renders; 1 exactly for an unfaded one
        return tw.palette_fit(torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0)

    images, captions = tw.make_dataset(60, seed=0)
    clean, clean_captions = tw.make_dataset(60, seed=0, unfaded=True)
    assert (fits(images) < 0.99).sum() >= 5  # the world's 30 % of faded scenes
    assert (fits(clean) > 0.99).all() and len(clean_captions) == 60
    kept = [text for text, fit in zip(captions, fits(images), strict=True) if fit > 0.99]
    assert clean_captions[: len(kept)] == kept  # the same scene stream, the faded scenes skipped


@pytest.mark.skipif(not os.path.isdir(sampler.TOY_MODEL_DIR), reason="the toy model is not pretrained yet")
def test_toy_model_loads_offline_and_samples():
    pipe = sampler.load_pipeline("toy")
    assert pipe.unet.config.sample_size == 8 and pipe.vae.config.scaling_factor != 1
    out = sampler.sample(
        pipe,
        ["a red circle", "a portrait of a doctor"],
        num_steps=4,
        guidance=5.0,
        generator=torch.Generator().manual_seed(0),
    )
    images = out["images"]
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert images.std() > 0.05  # a scene, not a flat image


def test_a_model_pretrained_into_any_folder_trains_on_the_toy_tasks(tmp_path):
    """`toyworld.py pretrain --out DIR` marks DIR as a toy-world model, so `train.py --model DIR` scores it
    with the toy detectors (no download), like --model toy, and so does evaluate.py; other folders keep the
    real rewards."""
    import evaluate
    import train

    out = str(tmp_path / "my-toy")
    tw.pretrain(tw.PretrainArgs(out=out, num_images=32, vae_steps=1, steps=1, batch_size=4,
                                unet_channels="16,32", text_attention="all"))  # fmt: skip
    marker = json.loads((tmp_path / "my-toy" / tw.MARKER).read_text())
    assert marker["pretrain_args"]["num_images"] == 32
    unet = sampler.load_pipeline(out).unet.config  # the architecture options reach the saved model
    assert unet.block_out_channels == [16, 32] and unet.down_block_types[0] == "CrossAttnDownBlock2D"
    with pytest.raises(ValueError, match="text_attention must be"):
        tw.build_pipeline(0, text_attention="8x8")
    for channels in [(64,), (32, 40)]:  # one level; a width the norm groups do not divide
        with pytest.raises(ValueError, match="unet_channels must be two widths, each a multiple of 16"):
            tw.build_pipeline(0, unet_channels=channels)
    with pytest.raises(ValueError, match="--unet-channels must be two integers"):
        tw.pretrain(tw.PretrainArgs(out=out, unet_channels="32x64"))
    assert tw.is_toy_model(out) and tw.is_toy_model("toy")
    assert not tw.is_toy_model(str(tmp_path)) and not tw.is_toy_model("tiny")
    run = str(tmp_path / "run")
    train.main(train.parse_args([
        "--model", out, "--rewards", "comp", "--iterations", "1", "--batch-size", "2", "--num-steps", "2",
        "--train-timesteps", "1", "--sample-every", "0", "--out", run,
    ]))  # fmt: skip
    logged = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert logged[0]["task"] == "comp" and "reward_all_detected" in logged[0]
    toy_seen = [prompt for prompt, _ in tw.get_task("comp").prompts("seen", 0)][:3]
    for model, is_toy in ((out, True), (str(tmp_path), False)):  # evaluate.py scores with the same choice
        args = evaluate.parse_args(["--model", model, "--suites", "comp", "--max-prompts", "3"])
        assert (evaluate.build_prompt_sets(args)[0].prompts == toy_seen) == is_toy


def test_toy_world_keeps_the_weight_free_rewards_and_rejects_unknown_names():
    assert tw.load_task("brightness", "toy").name == "brightness"
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        tw.load_task("nope", "toy")


# The specialist runs of docs/toyworld.md (the paper's batch-level advantages), cut
# short: batch 512 is what it takes for the signal to beat the policy-gradient noise on this small model, so
# each run costs minutes: about 4, 6 and 12 to 14 on one core, the slowest tests by far. Under the README's
# test command, `pytest -n auto --dist loadgroup` (pytest-xdist), the process group keeps pref in one process
# while skin then comp run in another.
SHORT_RUNS = {  # task: (extra train.py flags, held-out prompt set, xdist process group)
    "skin": (["--group-size", "16", "--iterations", "5"], "skin/occupations", "toy-rl-skin-comp"),
    "comp": (["--iterations", "10"], "comp/unseen", "toy-rl-skin-comp"),
    "pref": (["--iterations", "20"], "pref/test", "toy-rl-pref"),
}


@pytest.fixture
def one_thread():
    """The README's toy runs used one torch thread; with the same thread count the same seeds give the same
    numbers (the order of floating-point sums depends on it), so these tests replay those runs exactly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif(not os.path.isdir(sampler.TOY_MODEL_DIR), reason="the toy model is not pretrained yet")
@pytest.mark.parametrize(
    "task", [pytest.param(task, marks=pytest.mark.xdist_group(run[2])) for task, run in SHORT_RUNS.items()]
)
def test_a_short_run_moves_its_toy_reward(tmp_path, task, one_thread):
    """RL on one toy task, then evaluate.py on its held-out prompts with paired seeds: the task's metric
    moves the right way (SP down for skin; detection and preference up, winning most paired images)."""
    import evaluate
    import train

    extra, prompt_set, _ = SHORT_RUNS[task]
    sampling = ["--model", "toy", "--num-steps", "10", "--guidance", "5"]
    out = str(tmp_path / task)
    train.main(train.parse_args([
        *sampling, "--rewards", task, "--train-timesteps", "10", "--lr", "3e-5", "--clip-range", "1e-2",
        "--batch-size", "512", "--micro-batch", "128", "--sample-every", "0", "--out", out, *extra,
    ]))  # fmt: skip
    results = evaluate.evaluate(evaluate.parse_args([
        *sampling, "--checkpoint", f"rl={out}/final", "--suites", task, "--batch-size", "64",
        "--resamples", "2000", "--out", str(tmp_path / "eval"),
    ]))  # fmt: skip
    scored = results["sets"][prompt_set]
    value = {label: v["mean"] for label, v in scored["scores"][task]["value"].items()}
    if task == "skin":  # SP of 8 prompts: a win rate over 8 prompts says little, SP itself moves a lot
        assert value["base"] - value["rl"] > 0.05, value
    else:  # paired images (same prompt, same seed): RL wins clearly more than half of them
        win = scored["win_rate"]["rl"]
        assert value["rl"] > value["base"] and win["ci"][0] > 0.5, (value, win)
