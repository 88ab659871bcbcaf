"""Regularising and watching a run (issue 28): KL to the base policy, EMA weights, learning-rate warmup,
held-out evaluation with the reward-hacking alarm, and the precision-noise diagnostic."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from test_train import SMALL, metrics, run, torchrun, unet_weights

import monitor
import sampler
import train

BRIGHT = ["--rewards", "brightness", "--lr", "3e-3"]


def distance(a: dict, b: dict) -> float:
    return sum((a[k].double() - b[k].double()).square().sum().item() for k in a) ** 0.5


def test_kl_to_the_base_policy_is_zero_before_the_first_update_and_holds_the_policy_near_it(tmp_path):
    """Same seeds, beta 1e-9 (KL measured, no pull) against 1e4: the pulled policy ends nearer the base, in
    KL and in the weights. (AdamW moves every weight by about lr a step whatever pulls it, so the weights'
    distance shrinks less than the KL.)"""
    base = {k: v.clone() for k, v in sampler.load_pipeline("tiny").unet.state_dict().items()}
    flags = ["--rewards", "brightness", "--lr", "1e-4", "--iterations", "6", "--train-timesteps", "6"]
    free = run(tmp_path, *flags, "--kl-coef", "1e-9", name="free")
    held = run(tmp_path, *flags, "--kl-coef", "1e4", name="held")
    for out in (free, held):
        rows = metrics(out)
        assert rows[0]["kl_ref_per_step"][0] == 0.0  # the untrained policy is the base policy
        assert all(kl > 0 for row in rows for kl in row["kl_ref_per_step"][1:])
    last_free, last_held = metrics(free)[-1]["kl_ref_per_step"][0], metrics(held)[-1]["kl_ref_per_step"][0]
    assert last_held < 0.5 * last_free, (last_held, last_free)  # before the last iteration's updates
    moved_free = distance(unet_weights(os.path.join(free, "final")), base)
    moved_held = distance(unet_weights(os.path.join(held, "final")), base)
    assert moved_held < 0.8 * moved_free, (moved_held, moved_free)
    assert "kl_ref" not in metrics(run(tmp_path, *flags[:2], "--iterations", "1", name="off"))[0]


def test_kl_with_lora_uses_the_adapters_switched_off(tmp_path):
    pytest.importorskip("peft")
    out = run(tmp_path, *BRIGHT, "--iterations", "2", "--lora-rank", "4", "--kl-coef", "10")
    rows = metrics(out)
    assert rows[0]["kl_ref_per_step"][0] == 0.0 and rows[-1]["kl_ref"] > 0


def test_kl_is_zero_at_the_start_under_bf16_too(tmp_path):
    """The frozen reference keeps fp32 weights like the trained UNet, so autocast rounds both alike."""
    rows = metrics(run(tmp_path, *BRIGHT, "--iterations", "1", "--kl-coef", "1", "--mixed-precision", "bf16"))
    assert rows[0]["kl_ref_per_step"][0] == 0.0 and rows[0]["kl_ref_per_step"][1] > 0


def test_ema_is_saved_loads_in_diffusers_and_resumes_exactly(tmp_path):
    from diffusers import UNet2DConditionModel

    flags = [*BRIGHT, "--ema-decay", "0.5", "--save-every", "1", "--train-timesteps", "1",  # an update a step
             "--eval-every", "3"]  # fmt: skip
    full = run(tmp_path, *flags, "--iterations", "3", name="full")
    for name in ("checkpoint-1", "checkpoint-3", "final"):
        assert os.path.isdir(os.path.join(full, name, "unet_ema")), name
    ema = UNet2DConditionModel.from_pretrained(os.path.join(full, "final", "unet_ema"))  # stock diffusers
    weights, averaged = unet_weights(os.path.join(full, "final")), ema.state_dict()
    assert not all(torch.equal(weights[k], averaged[k]) for k in weights)  # an average, not the weights
    # ema_3 = 0.5 ema_2 + 0.5 theta_3, so theta_3 - ema_3 = ema_3 - ema_2 after the last step
    before = load_file(os.path.join(full, "checkpoint-2", "unet_ema", "diffusion_pytorch_model.safetensors"))
    for k in list(weights)[:5]:
        torch.testing.assert_close(weights[k] - averaged[k], averaged[k] - before[k], rtol=1e-4, atol=1e-6)
    part = run(tmp_path, *flags, "--iterations", "2", name="part")
    train.main(train.parse_args([*SMALL, *flags, "--out", part, "--iterations", "3", "--resume", "latest"]))
    resumed = load_file(os.path.join(part, "final", "unet_ema", "diffusion_pytorch_model.safetensors"))
    for k, v in averaged.items():
        assert torch.equal(resumed[k], v), k
    tuned = sampler.load_pipeline("tiny", checkpoint=os.path.join(full, "final", "unet_ema"))  # evaluate.py's
    assert torch.equal(tuned.unet.state_dict()[k], v)
    rows = [row for row in metrics(full) if "eval_reward_mean" in row]  # the live weights and their EMA
    assert [row["iteration"] for row in rows] == [0, 3]
    assert rows[0]["eval_ema_reward_mean"] == rows[0]["eval_reward_mean"]  # the EMA starts at the weights
    assert rows[1]["eval_ema_reward_mean"] != rows[1]["eval_reward_mean"]


def test_ema_of_a_lora_run_is_a_lora_folder(tmp_path):
    pytest.importorskip("peft")
    out = run(tmp_path, *BRIGHT, "--iterations", "2", "--lora-rank", "4", "--ema-decay", "0.9")
    assert sorted(os.listdir(os.path.join(out, "final", "lora_ema"))) == sorted(
        os.listdir(os.path.join(out, "final", "lora"))
    )
    pipe = sampler.load_pipeline("tiny", checkpoint=os.path.join(out, "final", "lora_ema"))
    assert any("lora" in name for name in pipe.unet.state_dict())
    stock = sampler.tiny_pipeline()
    stock.load_lora_weights(os.path.join(out, "final", "lora_ema"))  # what a diffusers user does
    ours = {k: v for k, v in pipe.unet.state_dict().items() if "lora_A" in k}
    theirs = {
        k.replace(".default_0.", ".default."): v for k, v in stock.unet.state_dict().items() if "lora_A" in k
    }
    assert ours and all(torch.equal(theirs[k], v) for k, v in ours.items())


def test_lr_warmup_ramps_linearly_and_resumes_exactly(tmp_path):
    flags = [*BRIGHT, "--lr-warmup", "4", "--train-timesteps", "2"]
    full = run(tmp_path, *flags, "--iterations", "3", name="full")
    state = torch.load(os.path.join(full, "checkpoint-3", "train_state.pt"), weights_only=False)
    assert state["optimizer_steps"] == 6
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [3e-3]  # warm after 4 of 6 steps
    part = run(tmp_path, *flags, "--iterations", "1", name="part")
    state = torch.load(os.path.join(part, "checkpoint-1", "train_state.pt"), weights_only=False)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(3e-3 * 2 / 4)  # step 2 of 4
    train.main(train.parse_args([*SMALL, *flags, "--out", part, "--iterations", "3", "--resume", "latest"]))
    for key, value in unet_weights(os.path.join(full, "final")).items():
        assert torch.equal(unet_weights(os.path.join(part, "final"))[key], value), key


def test_held_out_rows_every_n_iterations_on_fixed_prompts(tmp_path):
    out = run(tmp_path, *BRIGHT, "--iterations", "4", "--eval-every", "2", "--eval-rewards", "jpeg")
    rows = [row for row in metrics(out) if "eval_reward_mean" in row]
    assert [row["iteration"] for row in rows] == [0, 2, 4]  # the base model, then every 2 iterations
    assert all(row["eval_split"] == "test" and "eval_jpeg_mean" in row for row in rows)
    assert len({row["eval_reward_mean"] for row in rows}) > 1  # the weights moved
    uneven = run(tmp_path, *BRIGHT, "--iterations", "3", "--eval-every", "2", name="uneven")
    evaluated = [row["iteration"] for row in metrics(uneven) if "eval_reward_mean" in row]
    assert evaluated == [0, 2, 3]  # and the final weights
    # the same prompts and noise each time: a model that does not change scores the same
    again = run(tmp_path, *BRIGHT, "--iterations", "2", "--eval-every", "1", "--lr", "1e-12", name="still")
    still = [row["eval_reward_mean"] for row in metrics(again) if "eval_reward_mean" in row]
    assert still == pytest.approx([still[0]] * 3, rel=1e-6)


def test_held_out_prompts_come_from_the_held_out_split_and_stay_the_same(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a photo of thing {i}\n" for i in range(40)))
    args = train.parse_args([*SMALL, "--rewards", "jpeg", "--prompt-file", str(prompts), "--eval-every", "1",
                             "--iterations", "1", "--out", str(tmp_path / "o")])  # fmt: skip
    run_ = train.setup(args)
    test = {prompt for prompt, _ in run_.tasks[0].prompts("test", 0)}
    first, later = (train.sample_batch(run_, 0, iteration, held_out=True) for iteration in (0, 7))
    assert set(first.prompts) <= test and first.prompts == later.prompts
    assert torch.equal(first.latents, later.latents)  # the same noise
    few = tmp_path / "few.txt"
    few.write_text("a\nb\nc\nd\n")  # 10 % of 4 prompts: none held out
    with pytest.raises(ValueError, match="holds out no prompts for --eval-every"):
        train.setup(train.parse_args([*SMALL, "--rewards", "jpeg", "--prompt-file", str(few), "--eval-every",
                                      "1", "--out", str(tmp_path / "p")]))  # fmt: skip


def test_torchrun_two_ranks_with_kl_ema_and_held_out_evaluation(tmp_path):
    out = str(tmp_path / "ddp")
    torchrun(*SMALL, "--rewards", "brightness", "--iterations", "2", "--kl-coef", "0.1", "--ema-decay", "0.9",
             "--eval-every", "1", "--out", out)  # fmt: skip
    rows = metrics(out)
    assert [row["iteration"] for row in rows if "eval_ema_reward_mean" in row] == [0, 1, 2]
    assert all(row["samples"] == 8 and row["kl_ref"] > 0 for row in rows if "kl_ref" in row)
    state = torch.load(os.path.join(out, "checkpoint-2", "train_state.pt"), weights_only=True)
    assert torch.equal(state["rank_checksums"][0], state["rank_checksums"][1])
    assert os.path.isdir(os.path.join(out, "final", "unet_ema"))


def test_the_alarm_fires_when_the_training_reward_rises_while_the_held_out_one_falls():
    def rows(train_rewards, held_out, gold):
        out = []
        for i, (r, h, g) in enumerate(zip(train_rewards, held_out, gold, strict=True)):
            out.append({"iteration": 2 * i, "task": "pref", "eval_reward_mean": h, "eval_aesthetic_mean": g})
            out += [{"iteration": 2 * i + k, "task": "pref", "reward_mean": r} for k in (0, 1)]
            out.append({"iteration": 2 * i, "task": "pretrain", "loss": 1.0})
        return out

    hacking = rows([0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.4, 0.3], [5.0, 5.1, 5.2, 5.3])
    hacking.append({"iteration": 8, "task": "pref", "eval_reward_mean": 0.2, "eval_aesthetic_mean": 5.4})
    warnings = monitor.hacking_alarm(hacking, "pref")
    assert len(warnings) == 1 and "eval_reward_mean fell from 0.4 to 0.2" in warnings[0]
    assert "training reward rose from 0.2 to 0.4" in warnings[0]
    gold_falls = rows([0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [5.0, 4.9, 4.8, 4.7])
    assert ["eval_aesthetic_mean" in w for w in monitor.hacking_alarm(gold_falls, "pref")] == [True]
    healthy = rows([0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [5.0, 5.1, 5.2, 5.3])
    assert monitor.hacking_alarm(healthy, "pref") == [] and monitor.hacking_alarm(hacking, "skin") == []


def test_the_alarm_warns_inside_a_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(monitor, "hacking_alarm", lambda rows, task: calls.append(len(rows)) or ["hacking!"])
    with pytest.warns(UserWarning, match="hacking!"):
        run(tmp_path, *BRIGHT, "--iterations", "1", "--eval-every", "1")
    assert calls == [1, 3]  # after each evaluation row, with the rows so far


def test_precision_noise_is_zero_in_fp32_and_measured_under_bf16(tmp_path):
    fp32 = metrics(run(tmp_path, *BRIGHT, "--iterations", "1", name="fp32"))
    assert "precision_noise" not in fp32[0]
    with pytest.warns(UserWarning, match="rounding in --mixed-precision bf16 moves the policy ratio"):
        bf16 = metrics(run(tmp_path, *BRIGHT, "--iterations", "1", "--mixed-precision", "bf16",
                           "--clip-range", "1e-6", name="bf16"))  # fmt: skip
    assert bf16[0]["precision_noise"] > 1e-6
    same = torch.tensor([0.1, 0.2])
    assert monitor.precision_noise(same, same + 0.01, same, same + 0.01).item() == 0.0  # rounding-free


def test_every_new_flag_at_its_default_changes_nothing(tmp_path):
    args = train.parse_args([])
    assert (args.kl_coef, args.ema_decay, args.lr_warmup, args.eval_every, args.eval_rewards) == (
        0,
        0,
        0,
        0,
        "",
    )
    out = run(tmp_path, *BRIGHT, "--iterations", "1")
    assert sorted(os.listdir(os.path.join(out, "final"))) == ["args.json", "unet"]
    assert not {"kl_ref", "precision_noise"} & set(metrics(out)[0])
    with open(os.path.join(out, "args.json")) as f:
        assert json.load(f)["kl_coef"] == 0.0
