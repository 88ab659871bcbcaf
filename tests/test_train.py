"""train.py end to end on the tiny model: learning, the on-policy invariant, DDP, resume, guards."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import rewards
import sampler
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--model", "tiny", "--num-steps", "6", "--train-timesteps", "3", "--batch-size", "4",
         "--sample-every", "0", "--lr", "1e-3", "--clip-range", "0.05"]  # fmt: skip


def run(tmp_path, *extra, name="run"):
    out = str(tmp_path / name)
    train.main(train.parse_args([*SMALL, "--out", out, *extra]))
    return out


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def unet_weights(folder):
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun(*args, timeout=300):
    command = [*TORCHRUN, "train.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_help_documents_every_flag_with_paper_defaults():
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag in ["--rewards", "--clip-range", "--adv-clip", "--train-timesteps", "--lora-rank", "--resume"]:
        assert flag in text
    for paper in [
        "(paper: 1e-4)",
        "(paper: 2e-6)",
        "(paper: 50)",
        "(paper: 5)",
        "(paper: 7.0)",
        "(paper: 1.0)",
    ]:
        assert paper in text


def test_the_paper_is_the_default_and_auto_precision_and_checkpointing_follow_the_device(monkeypatch):
    args = train.parse_args([])
    assert (args.model, args.mixed_precision, args.gradient_checkpointing) == (
        "stabilityai/stable-diffusion-2-base", "auto", None)  # fmt: skip
    assert sampler.precision_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    assert sampler.precision_dtype("auto", "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert sampler.precision_dtype("auto", "cuda") == torch.float32  # V100 (emulated bf16 only): fp32
    assert sampler.precision_dtype("fp16", "cpu") == torch.float16
    for flags, on_cpu in [
        ([], False),
        (["--gradient-checkpointing"], True),
        (["--no-gradient-checkpointing"], False),
    ]:
        pipe, _, _ = train.load_model(train.parse_args([*SMALL, *flags]), torch.device("cpu"), torch.float32)
        assert pipe.unet.is_gradient_checkpointing == on_cpu, flags


def test_offline_the_card_command_stops_in_seconds_with_one_line_naming_the_toy_model(tmp_path):
    """No network, no cached copy: the paper's command (SD2) and evaluate.py say so in one line and write
    nothing."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-cache")}
    commands = [
        [sys.executable, os.path.join(ROOT, "train.py"), "--rewards", "pref,skin,comp", "--iterations", "1"],
        [sys.executable, os.path.join(ROOT, "evaluate.py"), "--suites", "pref"],
    ]
    for command in commands:
        start = time.time()
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        seconds = time.time() - start
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        errors = [line for line in result.stderr.splitlines() if ".py: error:" in line]
        assert len(errors) == 1 and "`--model toy` runs offline" in errors[0], result.stderr
        assert "stabilityai/stable-diffusion-2-base" in errors[0]
        assert seconds < 60, seconds  # about 10 s here, nearly all of it importing diffusers
        assert sorted(os.listdir(tmp_path)) == [], os.listdir(tmp_path)  # nothing written, no runs/ folder


def fixture_imagereward_hub(monkeypatch, tmp_path):
    """The hub as load_imagereward sees it, serving the reduced ImageReward of tests/data/imagereward (the
    parity fixture): ImageReward.pt, med_config.json and a BLIP tokenizer, all offline."""
    import huggingface_hub
    from transformers import BertTokenizer

    fixture_dir = os.path.join(ROOT, "tests", "data", "imagereward")
    fixture = torch.load(os.path.join(fixture_dir, "fixture.pt"), weights_only=True)
    torch.save(fixture["state_dict"], tmp_path / "ImageReward.pt")
    files = {"ImageReward.pt": str(tmp_path / "ImageReward.pt"),
             "med_config.json": os.path.join(fixture_dir, "med_config.json")}  # fmt: skip
    fetched = []

    def download(repo, filename, **kwargs):
        fetched.append((repo, filename))
        return files[filename]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    vocab = os.path.join(fixture_dir, "vocab.txt")
    monkeypatch.setattr(BertTokenizer, "from_pretrained", classmethod(lambda cls, name: cls(vocab)))
    monkeypatch.setattr(rewards, "VIT_LARGE", fixture["vision"])  # the fixture's ViT is cut down
    return fetched


def test_pref_trains_on_imagereward_end_to_end(tmp_path, monkeypatch):
    """--rewards pref: load_imagereward fetches the official files (here those of a tiny model of
    ImageReward's architecture), loads them through the port, and train.py scores, updates and logs."""
    fetched = fixture_imagereward_hub(monkeypatch, tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a photo of a red cat number {i}\n" for i in range(20)))
    flags = ["--rewards", "pref", "--prompt-file", str(prompts), "--iterations", "2"]
    out = run(tmp_path, *flags)
    assert sorted(fetched) == [(rewards.IMAGEREWARD_REPO, "ImageReward.pt"), (rewards.IMAGEREWARD_REPO,
                                                                              "med_config.json")]  # fmt: skip
    rows = metrics(out)
    assert [(row["iteration"], row["task"]) for row in rows] == [(0, "pref"), (1, "pref")]
    for row in rows:
        assert row["reward_std"] > 0 and np.isfinite(row["loss"])
    # the logged reward is the port's ImageReward score of the images iteration 0 sampled
    again = train.setup(train.parse_args([*SMALL, *flags, "--out", str(tmp_path / "again")]))
    batch = train.sample_batch(again, 0, 0)
    scores = again.tasks[0].reward(batch.images, batch.prompts, batch.metadata)[0]
    assert rows[0]["reward_mean"] == pytest.approx(scores.float().mean().item(), rel=1e-6)


def test_a_reward_model_that_cannot_be_fetched_stops_the_run_before_sampling(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(train, "sample_batch", lambda *args: pytest.fail("sampled before the rewards loaded"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    with pytest.raises(OSError, match="reward model.*--model toy"):
        run(tmp_path, "--rewards", "brightness,pref", "--prompt-file", str(prompts), "--iterations", "1")


def test_brightness_reward_rises_well_beyond_its_noise(tmp_path):
    out = run(tmp_path, "--rewards", "brightness", "--iterations", "24", "--batch-size", "16", "--lr", "1e-3")
    means = torch.tensor([row["reward_mean"] for row in metrics(out)])
    noise = (means[1:] - means[:-1])[:6].abs().mean()  # iteration-to-iteration noise early in training
    gain = means[-4:].mean() - means[:4].mean()
    assert gain > 5 * noise, (gain, noise, means)


def test_minibatch_parity_reward_improves(tmp_path):
    # 8 groups of 4 images per iteration; the reward of a group is -SP of its hue buckets
    out = run(tmp_path, "--rewards", "color", "--iterations", "40", "--batch-size", "32", "--group-size", "4",
              "--lr", "1e-4", "--clip-range", "0.01")  # fmt: skip
    means = torch.tensor([row["reward_mean"] for row in metrics(out)])  # -SP, higher is more diverse
    assert means[-8:].mean() > means[:8].mean() + 0.1, means


def test_on_policy_at_the_first_trained_step_and_clipping_later(tmp_path):
    out = run(
        tmp_path, "--rewards", "brightness", "--iterations", "3", "--lr", "1e-2", "--clip-range", "1e-3"
    )
    for row in metrics(out):
        assert row["approx_kl_per_step"][0] < 1e-10 and row["clipfrac_per_step"][0] == 0
        assert row["ratio_error_first"] < 1e-5
        assert max(row["approx_kl_per_step"][1:]) > 0 and max(row["clipfrac_per_step"][1:]) > 0
        assert len(set(row["trained_steps"])) == len(row["trained_steps"])  # drawn without replacement
        assert len(row["trained_steps"]) == len(row["grad_norm_per_step"]) == len(row["approx_kl_per_step"])
        assert min(row["grad_norm_per_step"]) > 0


def test_inner_epochs_revisit_the_batch_off_policy(tmp_path):
    out = run(tmp_path, "--rewards", "brightness", "--iterations", "2", "--inner-epochs", "2")
    for row in metrics(out):
        first_pass, second_pass = row["trained_steps"][:3], row["trained_steps"][3:]
        assert len(set(first_pass)) == len(set(second_pass)) == 3  # --train-timesteps 3, drawn per pass
        assert len(row["approx_kl_per_step"]) == 6 and row["ratio_error_first"] < 1e-5
        assert min(row["approx_kl_per_step"][3:]) > 0  # every step of the second pass is off-policy
    with pytest.raises(SystemExit):
        train.parse_args(["--inner-epochs", "0"])


def test_several_tasks_log_each_task_and_write_all_outputs(tmp_path):
    out = run(tmp_path, "--rewards", "brightness,jpeg", "--iterations", "2", "--sample-every", "1")
    rows = metrics(out)
    assert [(r["iteration"], r["task"]) for r in rows] == [
        (0, "brightness"),
        (0, "jpeg"),
        (1, "brightness"),
        (1, "jpeg"),
    ]
    keys = {"iteration", "task", "reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "seconds",
            "seconds_sampling", "seconds_reward", "seconds_update", "peak_memory_mb"}  # fmt: skip
    assert all(keys <= row.keys() for row in rows)
    for name in ["checkpoint-2", "final", "samples-00000-jpeg.png", "samples-00001-brightness.png"]:
        assert os.path.exists(os.path.join(out, name)), name
    assert json.load(open(os.path.join(out, "final", "args.json")))["rewards"] == "brightness,jpeg"


def test_wandb_gets_every_metrics_row_per_step_values_and_sample_images(tmp_path, monkeypatch):
    calls = []
    fake = type(sys)("wandb")  # a stand-in module: wandb is optional and needs an account
    fake.init = lambda **kw: calls.append(("init", kw["project"]))
    fake.log = lambda logged, step: calls.append(("log", step, logged))
    fake.finish = lambda: calls.append(("finish",))
    fake.Image = lambda image: ("image", image.size)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = run(
        tmp_path, "--rewards", "brightness", "--iterations", "2", "--log-with", "wandb", "--sample-every", "1"
    )
    logged = [call[1:] for call in calls if call[0] == "log"]  # (step, {tag: value})
    assert [(step, values["brightness/reward_mean"]) for step, values in logged] == [
        (row["iteration"], row["reward_mean"]) for row in metrics(out)
    ]
    for (_, values), row in zip(logged, metrics(out), strict=True):
        assert [values[f"brightness/clipfrac_per_step/{i}"] for i in range(3)] == row["clipfrac_per_step"]
        assert values["brightness/samples"][0] == "image" and "brightness/iteration" not in values
    assert calls[0] == ("init", "large-scale-rl-diffusion") and calls[-1] == ("finish",) and len(calls) == 4


def test_tensorboard_gets_every_metrics_row_per_step_values_and_sample_images(tmp_path, monkeypatch):
    calls = []

    class Writer:  # a stand-in for torch.utils.tensorboard's, which needs the tensorboard package
        def __init__(self, folder):
            calls.append(("open", os.path.basename(folder)))

        def add_scalar(self, tag, value, step):
            calls.append(("scalar", tag, value, step))

        def add_image(self, tag, image, step, dataformats):
            calls.append(("image", tag, image.shape, step, dataformats))

        def close(self):
            calls.append(("close",))

    fake = type(sys)("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    out = run(tmp_path, "--rewards", "brightness", "--iterations", "2", "--log-with", "tensorboard",
              "--sample-every", "10")  # fmt: skip
    logged = [call[2:] for call in calls if call[:2] == ("scalar", "brightness/reward_mean")]  # (value, step)
    assert logged == [(row["reward_mean"], row["iteration"]) for row in metrics(out)]
    first = metrics(out)[0]
    per_step = [call[2] for call in calls if call[0] == "scalar" and "/approx_kl_per_step/" in call[1]]
    assert per_step[:3] == first["approx_kl_per_step"]
    (image,) = [call for call in calls if call[0] == "image"]  # --sample-every 10: iteration 0 only
    assert image[1] == "brightness/samples" and image[2][2] == 3 and image[3:] == (0, "HWC")
    assert not [call for call in calls if call[0] == "scalar" and call[1].endswith("/iteration")]
    assert calls[0] == ("open", "tensorboard") and calls[-1] == ("close",)


def test_sample_grids_fit_their_images_and_carry_the_prompts(tmp_path):
    import outputs

    grid = outputs.sample_grid(torch.rand(3, 3, 32, 32), ["a red circle", "a portrait of a doctor", "a cat"])
    assert grid.size == (3 * 132, 128 + 30 + 4)  # three columns for three images, a caption row under them
    out = run(tmp_path, "--rewards", "brightness", "--iterations", "1", "--sample-every", "1")
    assert os.path.isfile(os.path.join(out, "samples-00000-brightness.png"))


def test_resume_continues_exactly(tmp_path):
    full = run(tmp_path, "--rewards", "brightness", "--iterations", "4", name="full")
    part = run(tmp_path, "--rewards", "brightness", "--iterations", "2", name="part")
    # refused before anything is touched: a fresh run over the checkpoints, a resume that would not be exact
    with pytest.raises(FileExistsError, match="--resume latest"):
        run(tmp_path, "--rewards", "brightness", "--iterations", "4", name="part")
    with pytest.raises(ValueError, match=r"--seed 0 -> 5.*--batch-size 4 -> 8"):
        train.main(train.parse_args([*SMALL, "--out", part, "--rewards", "brightness", "--iterations", "4",
                                     "--resume", "latest", "--seed", "5", "--batch-size", "8"]))  # fmt: skip
    assert [r["iteration"] for r in metrics(part)] == [0, 1]
    with open(os.path.join(part, "metrics.jsonl"), "a") as f:
        f.write('{"iteration": 2, "task": "bright')  # a line cut off by a kill
    train.main(train.parse_args([*SMALL, "--out", part, "--rewards", "brightness", "--iterations", "4",
                                 "--resume", "latest"]))  # fmt: skip
    for key, value in unet_weights(os.path.join(full, "final")).items():
        torch.testing.assert_close(
            unet_weights(os.path.join(part, "final"))[key], value, rtol=1e-5, atol=1e-6
        )
    assert [r["iteration"] for r in metrics(part)] == [0, 1, 2, 3]
    assert [r["reward_mean"] for r in metrics(part)] == pytest.approx(
        [r["reward_mean"] for r in metrics(full)]
    )


def test_resume_with_another_learning_rate_uses_it_and_says_so(tmp_path):
    out = run(tmp_path, "--rewards", "brightness", "--iterations", "1")
    with pytest.warns(UserWarning, match=r"continuing with changed settings: --lr 0.001 -> 0.0002"):
        train.main(train.parse_args([*SMALL, "--out", out, "--rewards", "brightness", "--iterations", "2",
                                     "--resume", "latest", "--lr", "2e-4"]))  # fmt: skip
    state = torch.load(os.path.join(out, "checkpoint-2", "train_state.pt"), weights_only=True)
    lrs = [group["lr"] for group in state["optimizer"]["param_groups"]]
    assert lrs == [2e-4], lrs  # not the checkpoint's 1e-3


def test_checkpoints_are_complete_and_leave_no_temporary_folder(tmp_path):
    out = run(tmp_path, "--rewards", "brightness", "--iterations", "2", "--save-every", "1")
    assert sorted(os.listdir(out)) == ["args.json", "checkpoint-1", "checkpoint-2", "final", "metrics.jsonl"]
    assert sorted(os.listdir(os.path.join(out, "checkpoint-1"))) == ["args.json", "train_state.pt", "unet"]


def test_keep_checkpoints_bounds_the_folders_and_final_holds_the_weights_only(tmp_path):
    out = run(
        tmp_path,
        "--rewards",
        "brightness",
        "--iterations",
        "4",
        "--save-every",
        "1",
        "--keep-checkpoints",
        "2",
    )
    assert [n for n in sorted(os.listdir(out)) if n.startswith("checkpoint-")] == [
        "checkpoint-3",
        "checkpoint-4",
    ]
    assert sorted(os.listdir(os.path.join(out, "final"))) == ["args.json", "unet"]  # no optimizer state
    with pytest.raises(FileNotFoundError, match="final/ has no optimizer state.*--resume latest"):
        train.main(train.parse_args([*SMALL, "--rewards", "brightness", "--out", out, "--iterations", "5",
                                     "--resume", os.path.join(out, "final")]))  # fmt: skip
    # a resume from the older kept checkpoint: that one is never deleted while this run goes on
    train.main(train.parse_args([*SMALL, "--rewards", "brightness", "--out", out, "--iterations", "6",
                                 "--save-every", "1", "--keep-checkpoints", "2",
                                 "--resume", os.path.join(out, "checkpoint-3")]))  # fmt: skip
    kept = [n for n in sorted(os.listdir(out)) if n.startswith("checkpoint-")]
    assert kept == ["checkpoint-3", "checkpoint-5", "checkpoint-6"]
    assert [row["iteration"] for row in metrics(out)] == [0, 1, 2, 3, 4, 5]


def test_bad_input_is_a_clear_error_at_start_up(tmp_path):
    with pytest.raises(ValueError, match="multiple of the images per prompt"):
        run(tmp_path, "--rewards", "color", "--iterations", "1", "--batch-size", "6", "--group-size", "4")
    with pytest.raises(ValueError, match="multiple of the images per prompt"):
        run(
            tmp_path,
            "--rewards",
            "jpeg",
            "--iterations",
            "1",
            "--batch-size",
            "6",
            "--images-per-prompt",
            "4",
        )
    with pytest.raises(ValueError, match="unknown reward 'nope'.*brightness"):
        run(tmp_path, "--rewards", "nope", "--iterations", "1")
    for bad in (["--eta", "0"], ["--save-every", "0"], ["--seed", "-1"], ["--pretrain-uncond-prob", "1.5"]):
        with pytest.raises(SystemExit):
            train.parse_args(bad)
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        run(tmp_path, "--rewards", "brightness", "--iterations", "1", "--pretrain-data", str(tmp_path))


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_non_finite_rewards_skip_the_update(tmp_path, monkeypatch, precision):
    def nan_task(device="cpu", prompt_file=None):
        task = rewards.TASKS["brightness"](device=device)
        task.reward = lambda images, prompts, metadata: (torch.full((len(prompts),), float("nan")), {})
        return task

    monkeypatch.setitem(rewards.TASKS, "nan", nan_task)
    with pytest.warns(UserWarning, match="non-finite rewards"):
        out = run(tmp_path, "--rewards", "nan", "--iterations", "1", "--mixed-precision", precision)
    assert metrics(out) == [
        {**metrics(out)[0], "task": "brightness", "non_finite_rewards": 4, "skipped_steps": 3}
    ]
    # bit-identical to the base model: bf16 runs train fp32 weights loaded in fp32, not rounded to bf16
    before = sampler_weights()
    for key, value in unet_weights(os.path.join(out, "final")).items():
        assert torch.equal(value, before[key]), key


def sampler_weights():
    return sampler.tiny_pipeline().unet.state_dict()


def pretrain_folder(tmp_path):
    """An L_pre imagefolder of 4 red squares of 32x32 with their captions (tmp_path/data)."""
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    with open(data / "metadata.jsonl", "w") as f:
        for i in range(4):
            Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(data / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": "a red square"}) + "\n")
    return data


def test_pretraining_loss_step(tmp_path):
    data = pretrain_folder(tmp_path)
    out = run(tmp_path, "--rewards", "brightness", "--iterations", "2", "--pretrain-data", str(data))
    rows = [row for row in metrics(out) if row["task"] == "pretrain"]
    assert [row["iteration"] for row in rows] == [0, 1] and all(row["loss"] > 0 for row in rows)
    # beta scales the L_pre gradient: same weights at the first L_pre step, so exactly 3x its norm
    out3 = run(tmp_path, "--rewards", "brightness", "--iterations", "1", "--pretrain-data", str(data),
               "--pretrain-weight", "3", name="beta3")  # fmt: skip
    row3 = next(row for row in metrics(out3) if row["task"] == "pretrain")
    assert row3["loss"] == rows[0]["loss"] and row3["grad_norm"] == pytest.approx(3 * rows[0]["grad_norm"])
    # a broken file in the data is left out with a warning, not the end of the run
    with open(data / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "broken.png", "text": "a red square"}) + "\n")
    (data / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="left out the unreadable .*broken.png"):
        out = run(tmp_path, "--rewards", "brightness", "--iterations", "1", "--pretrain-data", str(data),
                  name="broken")  # fmt: skip
    assert next(row for row in metrics(out) if row["task"] == "pretrain")["loss"] > 0


def test_pretraining_loss_trains_the_unconditional_prediction_on_a_share_of_empty_captions(monkeypatch):
    """Guidance uses eps_uncond, so L_pre replaces a --pretrain-uncond-prob share of its captions by "",
    drawn from the step's seed, and keeps the same noise and timesteps whatever that share is."""
    pipe = sampler.tiny_pipeline()
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    arrays = list(np.random.default_rng(0).integers(0, 256, (64, size, size, 3), dtype=np.uint8))
    captions = ["a red square"] * 64
    encoded = []
    real = sampler.encode_prompts
    monkeypatch.setattr(sampler, "encode_prompts", lambda p, texts: encoded.append(texts) or real(p, texts))

    def loss(texts, seed, uncond_prob):
        with torch.no_grad():
            return sampler.pretrain_loss(pipe, pipe.unet, texts, arrays, seed, uncond_prob).item()

    conditional = loss(captions, 0, 0.0)
    assert encoded[-1] == captions  # 0: every caption kept (the conditional prediction only)
    assert loss(captions, 0, 1.0) == loss([""] * 64, 0, 0.0) != conditional  # 1: all unconditional
    loss(captions, 0, 0.1)
    dropped = [text == "" for text in encoded[-1]]
    assert 1 <= sum(dropped) <= 15  # about 10 % of 64
    loss(captions, 0, 0.1)
    assert [text == "" for text in encoded[-1]] == dropped  # the seed decides which
    loss(captions, 1, 0.1)
    assert [text == "" for text in encoded[-1]] != dropped


def test_a_non_finite_pretraining_gradient_skips_only_that_step(tmp_path, monkeypatch):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (32, 32), (200, 0, 0)).save(data / "0.png")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a red square"}) + "\n")
    real = sampler.pretrain_loss
    monkeypatch.setattr(sampler, "pretrain_loss", lambda *a: real(*a) * float("nan"))
    with pytest.warns(UserWarning, match="pretrain: non-finite gradient, step skipped"):
        out = run(tmp_path, "--rewards", "brightness", "--iterations", "1", "--pretrain-data", str(data))
    row = next(row for row in metrics(out) if row["task"] == "pretrain")
    assert row["grad_norm"] == 0.0 and row["skipped_steps"] == 1  # strict JSON, counted as skipped
    # the RL steps still count; the skipped L_pre step left the weights as a run without L_pre
    plain = run(tmp_path, "--rewards", "brightness", "--iterations", "1", name="plain")
    tuned = unet_weights(os.path.join(out, "final"))
    for key, value in unet_weights(os.path.join(plain, "final")).items():
        assert torch.equal(tuned[key], value), key


def test_lora_mixed_precision_and_checkpointing(tmp_path):
    pytest.importorskip("peft")
    out = run(tmp_path, "--rewards", "brightness", "--iterations", "2", "--lora-rank", "4",
              "--mixed-precision", "bf16", "--gradient-checkpointing", "--micro-batch", "2")  # fmt: skip
    assert os.path.isdir(os.path.join(out, "final", "lora"))
    assert all(row["skipped_steps"] == 0 for row in metrics(out))
    tuned = sampler.load_pipeline("tiny", checkpoint=os.path.join(out, "final"))
    base = sampler.load_pipeline("tiny")
    seed = torch.Generator().manual_seed(0)
    images = [
        sampler.sample(p, ["a cat"], num_steps=4, generator=seed.manual_seed(0))["images"]
        for p in (tuned, base)
    ]
    assert not torch.allclose(*images)  # the trained adapter changes what the model draws
    train.main(train.parse_args([*SMALL, "--out", out, "--rewards", "brightness", "--iterations", "3",
                                 "--lora-rank", "4", "--resume", "latest"]))  # fmt: skip
    assert [row["iteration"] for row in metrics(out)] == [0, 1, 2]


def test_a_lora_checkpoint_loads_in_stock_diffusers_and_resumes_exactly(tmp_path):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    lora = [
        "--rewards",
        "brightness",
        "--lora-rank",
        "4",
        "--lr",
        "1e-2",
        "--clip-range",
        "0.5",
        "--save-every",
        "1",
    ]
    out = run(tmp_path, *lora, "--iterations", "2")
    sampler.tiny_pipeline().save_pretrained(tmp_path / "tiny")  # the base model as a diffusers folder

    def images(pipe):
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        return pipe(["a cat", "a dog"], num_inference_steps=4, generator=generator, output_type="pt").images

    stock = StableDiffusionPipeline.from_pretrained(tmp_path / "tiny", safety_checker=None)
    base = images(stock)
    stock.load_lora_weights(os.path.join(out, "final", "lora"))  # what a diffusers user does
    tuned = images(stock)
    assert (tuned - base).abs().max() > 1e-3  # loaded, not a silent no-op
    ours = sampler.load_pipeline(str(tmp_path / "tiny"), checkpoint=os.path.join(out, "final"))
    assert torch.equal(images(ours), tuned)
    stock.fuse_lora()
    torch.testing.assert_close(images(stock), tuned, rtol=0, atol=1e-5)
    # a checkpoint of the earlier peft layout still loads, with the same weights
    old = tmp_path / "old" / "lora"
    ours.unet.peft_config["default"].save_pretrained(old)
    save_file(get_peft_model_state_dict(ours.unet), old / "adapter_model.safetensors")
    assert torch.equal(
        images(sampler.load_pipeline(str(tmp_path / "tiny"), checkpoint=str(old.parent))), tuned
    )
    # resume stays exact: 1 iteration + resume + 1 equals 2 in one go
    part = run(tmp_path, *lora, "--iterations", "1", name="part")
    train.main(train.parse_args([*SMALL, *lora, "--out", part, "--iterations", "2", "--resume", "latest"]))
    whole, resumed = (
        load_file(os.path.join(o, "final", "lora", "pytorch_lora_weights.safetensors")) for o in (out, part)
    )
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)


def test_torchrun_two_ranks_end_with_identical_weights(tmp_path):
    out = str(tmp_path / "ddp")
    torchrun(*SMALL, "--rewards", "brightness,color", "--group-size", "2", "--iterations", "2", "--out", out,
             "--save-every", "1")  # fmt: skip
    rows = metrics(out)
    assert [r["task"] for r in rows] == ["brightness", "color"] * 2  # rank 0 alone writes the log
    assert all(r["samples"] == 8 for r in rows)  # the advantages saw both ranks' 4 images
    for name in ["checkpoint-1", "checkpoint-2", "final"]:
        assert os.path.isdir(os.path.join(out, name))
    # train.py compares checksums of every rank's weights before each save and records them.
    state = torch.load(
        os.path.join(out, "checkpoint-2", "train_state.pt"), weights_only=True
    )  # final/: weights
    checksums = state["rank_checksums"]
    assert checksums.shape == (2, 2) and torch.equal(checksums[0], checksums[1])
    assert not torch.equal(unet_weights(os.path.join(out, "final"))["conv_in.weight"],
                           sampler_weights()["conv_in.weight"])  # fmt: skip


def test_exit_distributed_ends_a_gloo_run_cleanly_even_when_its_threads_wait_long_for_the_gil(tmp_path):
    # train.py's last steps under torchrun, with a 1 s GIL switch interval: gloo's worker threads then wait
    # long for the GIL. Ending with destroy_process_group() and main()'s return instead, this script hung
    # in 4 of 20 runs (docs/engineering-notes.md), so five clean runs catch a regression about 2 times in 3.
    script = tmp_path / "ending.py"
    script.write_text(
        "import sys; sys.setswitchinterval(1.0)\n"
        "import pathlib, torch, torch.distributed as dist, train\n"
        "def main():  # as train.main: the DDP model is a local, freed when main() returns\n"
        "    dist.init_process_group('gloo')\n"
        "    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))\n"
        "    model(torch.randn(2, 4)).sum().backward()\n"
        "    train.all_gather(torch.ones(1, 3))\n"
        "    train.barrier()\n"
        "    mark = pathlib.Path(sys.argv[1], f'rank{dist.get_rank()}')\n"
        "    mark.write_text('saved')\n"
        "    train.exit_distributed()\n"
        "    mark.write_text('went on after exit_distributed()')\n"
        "main()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    for attempt in range(5):
        marks = tmp_path / str(attempt)
        marks.mkdir()
        command = [*TORCHRUN, str(script), str(marks)]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert [(marks / f"rank{r}").read_text() for r in range(2)] == ["saved", "saved"]


def test_torchrun_ranks_stop_together_when_one_cannot_read_its_pretraining_images(tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (32, 32), (200, 0, 0)).save(data / "good.png")
    (data / "broken.png").write_bytes(b"not a png")
    (data / "metadata.jsonl").write_text(
        "".join(
            json.dumps({"file_name": name, "text": "a red square"}) + "\n"
            for name in ["good.png", "broken.png"]
        )
    )
    # at iteration 0 rank 0 draws the broken image and rank 1 the good one (their L_pre seeds, asserted):
    # a rank that raised alone would leave the other waiting in the L_pre step's gradient all-reduce
    draws = [np.random.default_rng(train.rank_seed(0, 0, 1, rank)).choice(2, size=1)[0] for rank in (0, 1)]
    assert draws == [1, 0]
    command = [*TORCHRUN, "train.py", *SMALL, "--rewards", "brightness", "--iterations", "1", "--out",
               str(tmp_path / "run"), "--pretrain-data", str(data), "--pretrain-batch-size", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert result.stderr.count("some rank could read none of the 1 images it drew") >= 2, result.stderr[
        -3000:
    ]


def test_global_advantages_use_every_rank(tmp_path):
    script = tmp_path / "adv.py"
    script.write_text(
        "import torch, torch.distributed as dist, train\n"
        "dist.init_process_group('gloo'); rank = dist.get_rank()\n"
        "args = train.parse_args([])\n"
        "local = torch.tensor([0.0, 1.0]) + 10 * rank  # rank 0: 0, 1; rank 1: 10, 11\n"
        "everyone = train.all_gather(local)\n"
        "adv = train.global_advantages(everyone, torch.arange(4), args)[2 * rank : 2 * rank + 2]\n"
        "expected = (everyone - everyone.mean()) / (everyone.std(correction=0) + 1e-7)\n"
        "assert torch.allclose(adv, expected[2 * rank : 2 * rank + 2]), adv\n"
        "assert (adv < 0).all() if rank == 0 else (adv > 0).all()  # local normalisation would give -1, 1\n"
        "dist.destroy_process_group()\n"
    )
    command = [*TORCHRUN, str(script)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": ROOT})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def test_per_prompt_advantages():
    args = train.parse_args(["--per-prompt-advantages"])
    r = torch.tensor([1.0, 3.0, 10.0, 30.0, 5.0])
    adv = train.global_advantages(r, torch.tensor([0, 0, 1, 1, 2]), args)
    torch.testing.assert_close(adv[:4], torch.tensor([-1.0, 1.0, -1.0, 1.0]), rtol=0, atol=1e-5)
    batch = (r - r.mean()) / (r.std(correction=0) + 1e-7)  # a prompt seen once falls back to the batch
    torch.testing.assert_close(adv[4], batch[4])
    clipped = train.global_advantages(
        torch.tensor([0.0] * 999 + [1.0]), torch.arange(1000), train.parse_args([])
    )
    assert clipped.max() == 10.0  # --adv-clip


def test_images_per_prompt_give_per_prompt_baselines(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(
        train, "global_advantages", lambda r, ids, args: seen.append(ids) or torch.zeros_like(r)
    )
    run(tmp_path, "--rewards", "brightness", "--iterations", "1", "--batch-size", "4",
        "--images-per-prompt", "2", "--per-prompt-advantages")  # fmt: skip
    ids = seen[0]
    assert ids[0] == ids[1] and ids[2] == ids[3] and ids[0] != ids[2]  # two prompts, two images each


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = str(tmp_path / "preempted")
    command = [
        sys.executable,
        "train.py",
        *SMALL,
        "--rewards",
        "brightness",
        "--iterations",
        "1000",
        "--out",
        out,
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(out, "metrics.jsonl")) or not metrics(out):
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert "SIGTERM" in stdout
    saved = [n for n in os.listdir(out) if n.startswith("checkpoint-")]
    assert len(saved) == 1 and not os.path.exists(os.path.join(out, "final"))
    done = int(saved[0].split("-")[1])
    assert done == len(metrics(out))


# Loaded at start-up by every Python process whose path has its folder (torchrun's workers too): the process
# kills itself with SIGKILL when it is about to rename the checkpoint named in $KILL_AT_RENAME into place,
# that is, at the end of writing it: a deterministic kill -9 in the middle of a checkpoint write.
KILL_AT_RENAME = """import os, signal
_name, _replace = os.environ.get("KILL_AT_RENAME"), os.replace
def _replace_or_die(src, dst):
    if _name and os.fspath(src).endswith(os.sep + _name + ".tmp"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _replace(src, dst)
os.replace = _replace_or_die
"""


@pytest.mark.parametrize("ranks, killed_in", [(1, "checkpoint-2"), (1, "final"), (2, "checkpoint-1")])
def test_a_run_killed_while_writing_a_checkpoint_finishes_exactly_when_run_again(tmp_path, ranks, killed_in):
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(KILL_AT_RENAME)
    launch = [sys.executable] if ranks == 1 else [*TORCHRUN[:-1], f"--nproc_per_node={ranks}"]

    def train_py(out, *extra, kill_at=""):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(tmp_path / "hook"),
            "KILL_AT_RENAME": kill_at,
        }
        save_every = "2" if ranks == 1 else "1"
        command = [*launch, "train.py", *SMALL, "--rewards", "brightness", "--iterations", "3",
                   "--save-every", save_every, "--out", str(tmp_path / out), *extra]  # fmt: skip
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)

    assert train_py("full").returncode == 0
    killed = train_py("run", kill_at=killed_in)
    assert killed.returncode != 0 and os.path.isdir(tmp_path / "run" / f"{killed_in}.tmp")
    assert not os.path.exists(tmp_path / "run" / killed_in)
    if killed_in == "final":  # the run holds its checkpoints: --resume latest continues it
        again = train_py("run", "--resume", "latest")
        said = again.stdout
    else:  # no complete checkpoint yet: --resume latest says what to do, the same command starts it again
        refused = train_py("run", "--resume", "latest")
        assert refused.returncode != 0 and "same command without --resume" in refused.stderr
        assert ranks > 1 or "same command without --resume" in refused.stderr.splitlines()[-1]  # one line
        again = train_py("run")
        said = refused.stdout  # the first run in the folder after the kill clears it
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"removed {killed_in}.tmp" in said
    assert sorted(
        n for n in os.listdir(tmp_path / "run") if n.startswith(("checkpoint-", "final"))
    ) == sorted(n for n in os.listdir(tmp_path / "full") if n.startswith(("checkpoint-", "final")))
    final, full = unet_weights(tmp_path / "run" / "final"), unet_weights(tmp_path / "full" / "final")
    assert all(torch.equal(final[key], full[key]) for key in full)  # bit for bit
