"""Faults a cluster run meets: a second writer, a rollback, a stuck rank, damaged files, a full disk, nonsense
values. Each is refused before any work or survived, with one line that says what to do."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file, save_file
from test_train import ROOT, SMALL, TORCHRUN, metrics, run

import outputs
import sampler
import train

BRIGHT = ["--rewards", "brightness"]


def train_py(*args, env=None, timeout=300):
    """python train.py as a user runs it, on the tiny model."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "train.py", *SMALL, *BRIGHT, *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def one_line_error(result) -> str:
    """The error of a run refused at start-up: exit code 2, no traceback, its last stderr line."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: "), last
    return last


def test_a_second_run_on_the_same_out_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "train.py", *SMALL, *BRIGHT, "--iterations", "1000", "--out", str(out)]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.exists(out / "metrics.jsonl") or not metrics(out):
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.5)
    second = train_py("--iterations", "2", "--seed", "1", "--out", str(out))  # say, another seed by mistake
    assert f"{out} is in use by another train.py run (pid {first.pid}" in one_line_error(second)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 0
    assert not os.path.exists(out / "train.lock")  # released at exit
    done = max(outputs.checkpoint_iterations(out))
    # a lock left behind by a run that was killed (-9) is taken over, with a warning
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "train.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with pytest.warns(UserWarning, match=f"took over the lock of pid {dead.pid}, a run that died"):
        run(tmp_path, *BRIGHT, "--iterations", str(done + 1), "--resume", "latest")
    assert [row["iteration"] for row in metrics(out)] == list(range(done + 1))


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path, capsys):
    out = run(tmp_path, *BRIGHT, "--iterations", "4", "--save-every", "1")
    # roll back to checkpoint-2 (say, with a lower learning rate), stopped at 3 by the time limit
    train.main(train.parse_args([*SMALL, *BRIGHT, "--out", out, "--iterations", "3",
                                 "--resume", os.path.join(out, "checkpoint-2")]))  # fmt: skip
    assert "the later checkpoint-3, checkpoint-4, final moved to" in capsys.readouterr().out
    (aside,) = [name for name in os.listdir(out) if name.startswith("abandoned-2-")]
    assert sorted(os.listdir(os.path.join(out, aside))) == [
        "checkpoint-3",
        "checkpoint-4",
        "final",
        "metrics.jsonl",
    ]
    assert outputs.latest(out) == os.path.join(out, "checkpoint-3")  # the new branch's, not the old one's
    train.main(train.parse_args([*SMALL, *BRIGHT, "--out", out, "--iterations", "4", "--resume", "latest"]))
    assert [row["iteration"] for row in metrics(out)] == [0, 1, 2, 3]


STUCK_RANK = """import os
if os.environ.get("RANK") == "1":  # rank 1's reward never returns; the agent (no RANK) is left alone
    import time
    import rewards
    def _stuck(images, prompts, metadata):
        time.sleep(3600)
    rewards.TASKS["brightness"] = rewards.weight_free_task("brightness", _stuck)
"""


def test_a_stuck_rank_ends_the_job_after_dist_timeout(tmp_path):
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(STUCK_RANK)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), ROOT]),
    }
    command = [*TORCHRUN, "train.py", *SMALL, *BRIGHT, "--iterations", "2", "--dist-timeout", "5",
               "--out", str(tmp_path / "run")]  # fmt: skip
    start = time.time()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    # rank 0 waits 5 s in the reward gather, fails, and torchrun ends rank 1 (30 s after its SIGTERM)
    assert result.returncode != 0 and time.time() - start < 300, result.stderr[-2000:]


def test_non_finite_weights_are_named_when_loaded_and_never_saved(tmp_path, monkeypatch):
    out = run(tmp_path, *BRIGHT, "--iterations", "1")
    path = os.path.join(out, "checkpoint-1", "unet", "diffusion_pytorch_model.safetensors")
    weights = load_file(path)
    next(iter(weights.values()))[0] = float("nan")  # bit rot
    save_file(weights, path)
    with pytest.raises(ValueError, match=r"checkpoint-1/unet holds non-finite weights \(1 tensors"):
        train.main(
            train.parse_args([*SMALL, *BRIGHT, "--out", out, "--iterations", "2", "--resume", "latest"])
        )
    with pytest.raises(ValueError, match="non-finite weights"):  # what evaluate.py --checkpoint loads
        sampler.load_pipeline("tiny", checkpoint=os.path.join(out, "checkpoint-1"))

    real_step = train.optimizer_step

    def diverging_step(run, what):  # an update that leaves a NaN in the weights
        result = real_step(run, what)
        run.trainable[0].data.view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(train, "optimizer_step", diverging_step)
    with pytest.raises(
        RuntimeError, match="non-finite weights: the update diverged; not saving checkpoint-1"
    ):
        run(tmp_path, *BRIGHT, "--iterations", "1", name="diverged")


def test_start_up_errors_are_one_line_without_a_traceback(tmp_path):
    out = run(tmp_path, *BRIGHT, "--iterations", "1")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    damaged = {}
    for name, broken in [("train_state.pt", b""), ("args.json", b"{not json")]:
        folder = tmp_path / f"bad-{name}"
        shutil.copytree(os.path.join(out, "checkpoint-1"), folder)
        (folder / name).write_bytes(broken)
        damaged[name] = str(folder)
    cases = [
        (["--rewards", "nope", "--out", str(tmp_path / "a")], "unknown reward 'nope'"),
        (
            ["--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "b")],
            "could not load --model " + str(tmp_path / "no-model") + ": no such folder",
        ),
        (["--prompt-file", str(empty), "--out", str(tmp_path / "c")], "has no prompts"),
        (["--out", str(empty)], "is a file; pass a folder"),
        (["--out", str(tmp_path / "d"), "--resume", str(tmp_path)], "is not a train.py checkpoint"),
        (
            ["--out", str(tmp_path / "e"), "--resume", damaged["train_state.pt"]],
            "train_state.pt cannot be read",
        ),
        (["--out", str(tmp_path / "f"), "--resume", damaged["args.json"]], "args.json cannot be read"),
    ]
    for args, message in cases:
        assert message in one_line_error(train_py("--iterations", "2", *args)), args
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write("\0\0\0\n")  # a NUL line, as a crash of the file system can leave
    said = one_line_error(train_py("--iterations", "2", "--out", out, "--resume", "latest"))
    assert f"{os.path.join(out, 'metrics.jsonl')} line 2 is not a metrics row" in said


def test_nonsense_values_are_refused_before_any_work(tmp_path, capsys):
    for flag, value in [("--batch-size", "0"), ("--group-size", "0"), ("--images-per-prompt", "-1"),
                        ("--clip-range", "0"), ("--adv-clip", "-1"), ("--max-grad-norm", "-1"),
                        ("--lora-rank", "-2"), ("--lr", "nan"), ("--dist-timeout", "0")]:  # fmt: skip
        with pytest.raises(SystemExit):
            train.parse_args([flag, value])
        assert f"{flag} must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--rewards", ","])
    assert "names no task" in capsys.readouterr().err
    out = run(tmp_path, *BRIGHT, "--iterations", "2")
    with pytest.raises(ValueError, match="is at iteration 2, beyond --iterations 1"):
        train.main(
            train.parse_args([*SMALL, *BRIGHT, "--out", out, "--iterations", "1", "--resume", "latest"])
        )
    assert sorted(os.listdir(os.path.join(out, "final"))) == ["args.json", "unet"]  # untouched


def test_a_full_disk_is_named_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):  # what torch.save raises when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 512 vs 448")

    monkeypatch.setattr(outputs.torch, "save", full_disk)
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    out = tmp_path / "run"
    with pytest.raises(
        OSError, match=f"could not write {out}/checkpoint-1 \\(no space left on the device\\); free "
    ):
        run(tmp_path, *BRIGHT, "--iterations", "1")
    assert not [name for name in os.listdir(out) if name.startswith("checkpoint-")]


def test_the_metrics_rewrite_at_start_up_loses_nothing_if_killed(tmp_path, monkeypatch):
    out = str(tmp_path)
    rows = [json.dumps({"iteration": i, "task": "brightness"}) + "\n" for i in range(3)]
    (tmp_path / "metrics.jsonl").write_text("".join(rows))

    def killed(src, dst):
        raise KeyboardInterrupt  # the moment the kept lines replace the file

    monkeypatch.setattr(outputs.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        outputs.open_logs({"out": out, "log_with": "none"}, 1)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(rows)
    monkeypatch.undo()
    outputs.open_logs({"out": out, "log_with": "none"}, 1)
    assert (tmp_path / "metrics.jsonl").read_text() == rows[0]
