"""What a result costs: the sampler's overhead, one iteration against its UNet floor, memory, DDP scaling,
throughput knobs and a FLOP-based cost model of the paper's run (docs/benchmarks.md). Not part of the method.

    python tools/bench.py --model tiny --threads 1 --repeats 7                    # CPU, a few minutes
    python tools/bench.py --model stabilityai/stable-diffusion-2-base --batch-size 16 --num-steps 50 \\
        --mixed-precision bf16 --gradient-checkpointing --threads 8 --compile   # one GPU or two
    python tools/bench.py --sections knobs,flops --threads 2                      # some sections only

Every comparison times its sides interleaved in one process (A, B, B, A, ...) and reports
min / median / max over --repeats rounds, because on a shared machine identical runs drift by a third
within minutes. Training is timed by running train.main itself, so the numbers are those of our code.
"""

import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from diffusers.utils.torch_utils import randn_tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

# The project's modules are in the repo root, one level up, so that `python tools/bench.py` finds them.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sampler
import toyworld
import train
from flags import option, parse

ROOT = os.path.dirname(os.path.abspath(train.__file__))  # torchrun runs train.py from here

# The paper's run: SD2 base at 512x512, 2048 samples per iteration, about 1000
# iterations, 50 DDIM steps with CFG, 5 trained steps, gradient checkpointing; 12.1 h on 128 A100s.
PAPER_SAMPLES, PAPER_ITERATIONS, PAPER_STEPS, PAPER_TRAINED = 2048, 1000, 50, 5
PAPER_A100_HOURS = 12.1 * 128
SD2_UNET = dict(
    sample_size=64,
    cross_attention_dim=1024,
    block_out_channels=(320, 640, 1280, 1280),
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD2_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=512,
)

SECTIONS = ("sampler", "iteration", "memory", "ddp", "knobs", "flops")


@dataclass
class BenchArgs:
    model: str = option("tiny", "'tiny', 'toy', a hub id or a diffusers folder")
    reward: str | None = option(
        None, "task of the timed iterations (default: pref for toy, else brightness: weight-free)"
    )
    threads: int = option(1, "torch intra-op threads (and OMP_NUM_THREADS of DDP runs)")
    batch_size: int = option(8, "images per batch and per rank (a reward std needs 2)", at_least=2)
    num_steps: int = option(20, "DDIM steps T")
    train_timesteps: int = option(5, "trained steps K per iteration")
    guidance: float = option(7.0, "classifier-free guidance scale")
    eta: float = option(1.0, "DDIM eta")
    mixed_precision: str = option(
        "auto", "autocast dtype, passed to train.py (auto: bf16 on CUDA, or fp32)", choices=sampler.PRECISIONS
    )
    gradient_checkpointing: bool | None = option(
        None, "in the timed iterations (default: as train.py, on with CUDA)"
    )
    repeats: int = option(5, "interleaved rounds of every comparison")
    iterations: int = option(3, "train.py iterations per round (the first is dropped)", at_least=2)
    memory_timesteps: str = option("1,2,5", "--train-timesteps values of the memory table")
    ddp_processes: str = option("1,2", "process counts of the ddp section")
    sections: str = option(",".join(SECTIONS), "comma list of sections to run")
    compile: bool = option(False, "also time torch.compile'd UNet forwards")
    peak_tflops: float = option(312.0, "the GPU's dense peak (A100 bf16: 312)")
    out: str = option("runs/bench.json", "JSON report")


def parse_args(argv=None) -> BenchArgs:
    args, parser = parse(BenchArgs, __doc__, argv)
    if not args.reward:
        args.reward = "pref" if toyworld.is_toy_model(args.model) else "brightness"
    if not set(args.sections.split(",")) <= set(SECTIONS):
        parser.error(f"--sections must be a comma list of {', '.join(SECTIONS)}")
    if max(map(int, args.memory_timesteps.split(","))) > args.num_steps:
        parser.error("--memory-timesteps must not exceed --num-steps")
    return args


#### Timing: interleaved rounds, min / median / max ####


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, device) -> dict[str, list[float]]:
    """Seconds of each function over `repeats` rounds after one warm-up call each; the order reverses
    every round (A B, B A, ...) so that a slow drift of the machine hits both sides alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for r in range(repeats):
        for name in list(fns)[:: 1 if r % 2 == 0 else -1]:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def ratios(a: list[float], b: list[float]) -> dict[str, float]:
    """min / median / max of the per-round ratio a_i / b_i (both sides of a round ran back to back)."""
    return spread([x / y for x, y in zip(a, b, strict=True)])


def fmt(s: dict[str, float], unit: str = "", scale: float = 1.0) -> str:
    return f"{s['median'] * scale:.3g}{unit} [{s['min'] * scale:.3g} .. {s['max'] * scale:.3g}]"


#### Shared inputs ####


def train_argv(args: BenchArgs, out: str, iterations: int, train_timesteps: int | None = None) -> list[str]:
    argv = ["--model", args.model, "--rewards", args.reward, "--iterations", str(iterations),
            "--batch-size", str(args.batch_size), "--group-size", str(args.batch_size),
            "--num-steps", str(args.num_steps),
            "--train-timesteps", str(train_timesteps or args.train_timesteps),
            "--guidance", str(args.guidance), "--eta", str(args.eta),
            "--mixed-precision", args.mixed_precision,
            "--sample-every", "0", "--save-every", str(iterations), "--out", out]  # fmt: skip
    flag = "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing"
    return argv + [flag]  # explicit: train.py's default turns checkpointing on with CUDA


def run_train(argv: list[str]) -> list[dict]:
    """train.main in this process; its metrics rows (seconds_* exclude setup and checkpoints)."""
    train.main(train.parse_args(argv))
    with open(os.path.join(argv[argv.index("--out") + 1], "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def unet_inputs(pipe, args: BenchArgs):
    """The UNet's inputs in sampling and training: CFG doubles the batch (one batched call). The text
    conditioning is keyword arguments (SD's text embeddings; SDXL's add its pooled embedding and size ids)."""
    cfg = 1 if args.guidance == 1.0 else 2
    cond = sampler.encode_prompts(pipe, ["a photo of a cat"] * (cfg * args.batch_size))
    unet = pipe.unet
    size = unet.config.sample_size
    latents = torch.randn(cfg * args.batch_size, unet.config.in_channels, size, size, device=unet.device)
    timestep = torch.tensor(pipe.scheduler.config.num_train_timesteps // 2, device=unet.device)
    return latents.to(unet.dtype), timestep, sampler.unet_conditioning(cond, 1.0, unet.dtype)


#### 1. Sampler overhead: sample() vs a bare diffusers DDIM loop ####


@torch.no_grad()
def bare_ddim_loop(pipe, prompts: list[str], num_steps: int, guidance: float, eta: float, generator):
    """What a user would write without RL: the same UNet calls and diffusers' DDIMScheduler.step, no
    log-probs, no stored trajectory."""
    unet, scheduler = pipe.unet, pipe.scheduler
    cond = sampler.encode_prompts(pipe, prompts)
    scheduler.set_timesteps(num_steps, device=unet.device)
    size = unet.config.sample_size
    shape = (len(prompts), unet.config.in_channels, size, size)
    latents = randn_tensor(shape, generator=generator, device=unet.device, dtype=torch.float32)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        noise_pred = sampler.predict_noise(unet, latents, t, cond, guidance)
        latents = scheduler.step(noise_pred, t, latents, eta=eta, generator=generator).prev_sample
    return sampler.decode(pipe, latents)


def bench_sampler(pipe, args: BenchArgs, device) -> dict:
    prompts = ["a photo of a cat"] * args.batch_size
    assert isinstance(pipe.scheduler, DDIMScheduler)

    def ours():
        generator = torch.Generator().manual_seed(0)
        sampler.sample(pipe, prompts, args.num_steps, args.guidance, args.eta, generator)

    def bare():
        generator = torch.Generator().manual_seed(0)
        bare_ddim_loop(pipe, prompts, args.num_steps, args.guidance, args.eta, generator)

    times = interleaved({"sample": ours, "bare_ddim": bare}, args.repeats, device)
    return {
        "seconds": {k: spread(v) for k, v in times.items()},
        "ratio": ratios(times["sample"], times["bare_ddim"]),
    }


#### 2. Iteration efficiency: train.py's iteration vs T forwards + K forward-backwards ####


def floor_calls(pipe, args: BenchArgs) -> dict[str, Callable[[], object]]:
    """The UNet calls one iteration cannot avoid, at the doubled CFG batch: a no-grad forward
    (sampling) and a forward + backward (training); and, outside the floor, the optimizer step
    (gradient clipping + fused AdamW) that train.py takes after each backward."""
    unet = pipe.unet
    latents, timestep, text = unet_inputs(pipe, args)
    params = list(unet.parameters())
    grads = [torch.randn_like(p) for p in params]
    optimizer = torch.optim.AdamW(params, lr=0.0, fused=True)  # lr 0: the timed weights stay as loaded

    @torch.no_grad()
    def forward():
        unet(latents, timestep, **text)

    def forward_backward():
        unet(latents, timestep, **text).sample.float().mean().backward()
        unet.zero_grad(set_to_none=True)

    def optimizer_step():
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    return {"forward": forward, "forward_backward": forward_backward, "optimizer_step": optimizer_step}


def bench_iteration(args: BenchArgs, device, tmp: str) -> dict:
    """Rounds of one train.main run (its first iteration dropped: first AdamW step, allocations)
    interleaved with the floor's calls timed alone (median of 3 each)."""
    pipe = sampler.load_pipeline(args.model, device=device)
    pipe.unet.requires_grad_(True)
    if args.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    calls = floor_calls(pipe, args)
    rows, floors, optimizer_steps = [], [], []
    for r in range(args.repeats + 1):  # round 0 warms up and is dropped
        round_rows = run_train(train_argv(args, os.path.join(tmp, f"iteration-{r}"), args.iterations))[1:]
        call = {k: statistics.median(v) for k, v in interleaved(calls, 3, device).items()}
        floor = args.num_steps * call["forward"] + args.train_timesteps * call["forward_backward"]
        if r:
            rows += round_rows
            floors += [floor] * len(round_rows)
            optimizer_steps += [args.train_timesteps * call["optimizer_step"]] * len(round_rows)
    parts = {
        k: [row[k] for row in rows]
        for k in ("seconds", "seconds_sampling", "seconds_reward", "seconds_update")
    }
    return {
        "seconds": {k: spread(v) for k, v in parts.items()},
        "floor_seconds": spread(floors),
        "optimizer_seconds": spread(optimizer_steps),
        "ratio": ratios(parts["seconds"], floors),
        "ratio_with_optimizer": ratios(
            parts["seconds"], [f + o for f, o in zip(floors, optimizer_steps, strict=True)]
        ),
        "samples_per_second": spread([row["samples"] / row["seconds"] for row in rows]),
    }


#### 3. Memory: peak tensor memory of one training iteration ####


class TensorMemory(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created while the mode is on, each followed from
    its first appearance to its free (CPU has no allocator counter, and process RSS is a lifetime
    maximum that would hide the difference between two configurations)."""

    def __init__(self):
        super().__init__()
        self.storages = WeakIdKeyDictionary()
        self.live = self.peak = 0

    def _free(self, nbytes: int):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                if storage not in self.storages:
                    self.storages[storage] = nbytes = storage.nbytes()
                    weakref.finalize(storage, self._free, nbytes)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
        return out


def peak_memory_mb(fn: Callable[[], object], device) -> float:
    """Peak memory of the tensors fn allocates: the CUDA allocator's counter, or TensorMemory on CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with TensorMemory() as memory:
        fn()
    return memory.peak / 2**20


def bench_memory(args: BenchArgs, device, tmp: str) -> list[dict]:
    """Two iterations of train.main (from the second on, the AdamW states exist during the update):
    weights, gradients, AdamW states and the update's activations, which set the peak."""
    table = []
    for checkpointing in (False, True):
        for k in map(int, args.memory_timesteps.split(",")):
            run_args = dataclasses.replace(args, gradient_checkpointing=checkpointing)
            argv = train_argv(run_args, os.path.join(tmp, f"memory-{checkpointing}-{k}"), 2, k)
            mb = peak_memory_mb(lambda argv=argv: run_train(argv), device)
            table.append({"gradient_checkpointing": checkpointing, "train_timesteps": k, "peak_mb": mb})
    return table


#### 4. Scale: samples per second with N DDP processes (per-rank batch fixed) ####


def bench_ddp(args: BenchArgs, tmp: str) -> dict:
    counts = [int(n) for n in args.ddp_processes.split(",") if n]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rates = {n: [] for n in counts}
    for r in range(max(1, args.repeats // 2)):
        for n in counts[:: 1 if r % 2 == 0 else -1]:
            out = os.path.join(tmp, f"ddp-{n}-{r}")
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                       "train.py", *train_argv(args, out, args.iterations)]  # fmt: skip
            result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
            if result.returncode:
                raise RuntimeError(f"torchrun with {n} processes failed:\n{result.stderr[-2000:]}")
            with open(os.path.join(out, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f][1:]  # the first iteration warms up
            rates[n] += [row["samples"] / row["seconds"] for row in rows]
    report = {str(n): spread(v) for n, v in rates.items()}
    if 1 in rates and 2 in rates:
        report["efficiency_2"] = statistics.median(rates[2]) / (2 * statistics.median(rates[1]))
    return report


#### 5. Throughput knobs: SDPA attention, channels_last, torch.compile (TF32 is CUDA-only) ####


def bench_knobs(args: BenchArgs, device) -> dict:
    """The UNet's no-grad forward at the CFG batch with each knob toggled, against the default
    (SDPA attention, contiguous memory)."""
    variants = {}
    for name in ["default", "classic_attention", "channels_last"] + (["compile"] if args.compile else []):
        pipe = sampler.load_pipeline(args.model, device=device)
        latents, timestep, text = unet_inputs(pipe, args)
        unet = pipe.unet
        if name == "classic_attention":
            unet.set_attn_processor(AttnProcessor())  # explicit softmax(QK^T)V instead of SDPA
        if name == "channels_last":
            unet.to(memory_format=torch.channels_last)
            latents = latents.to(memory_format=torch.channels_last)
        if name == "compile":
            unet = torch.compile(unet)
        variants[name] = torch.no_grad()(
            lambda unet=unet, latents=latents, t=timestep, text=text: unet(latents, t, **text)
        )
    times = interleaved(variants, args.repeats, device)
    report = {name: {"seconds": spread(v), "ratio": ratios(v, times["default"])} for name, v in times.items()}
    report["tf32"] = "on in train.py on CUDA (matmul and cuDNN); not measurable on CPU"
    return report


#### 6. Cost model: UNet FLOPs of an iteration, achieved FLOP/s, the paper's run ####


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def unet_flops(unet, latents, timestep, text: dict) -> tuple[int, int]:
    """FLOPs of one forward and of one forward + backward of the UNet on these inputs."""
    unet.requires_grad_(True)
    with torch.no_grad():
        forward = count_flops(lambda: unet(latents, timestep, **text))
    backward = count_flops(lambda: unet(latents, timestep, **text).sample.sum().backward())
    unet.zero_grad(set_to_none=True)
    return forward, backward


def iteration_flops(
    forward: int, forward_backward: int, steps: int, trained: int, checkpointing: bool
) -> int:
    """T sampling forwards + K training forward-backwards (+ K recomputed forwards with checkpointing)."""
    return steps * forward + trained * (forward_backward + (forward if checkpointing else 0))


def paper_cost() -> dict:
    """The paper's run counted on SD2 base built from its config on the meta device (no weights):
    per sample one CFG forward (batch 2) per DDIM step, 5 forward-backwards, their recompute, one VAE
    decode. Reward models, text encoder and communication are left out."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD2_UNET)
        vae = AutoencoderKL(**SD2_VAE)
        latents, text = torch.empty(2, 4, 64, 64), {"encoder_hidden_states": torch.empty(2, 77, 1024)}
        forward, forward_backward = unet_flops(unet, latents, torch.tensor(500), text)
        decode = count_flops(lambda: vae.decode(torch.empty(1, 4, 64, 64)))
    per_sample = iteration_flops(forward, forward_backward, PAPER_STEPS, PAPER_TRAINED, True) + decode
    total = per_sample * PAPER_SAMPLES * PAPER_ITERATIONS
    return {
        "unet_forward_cfg_tflop": forward / 1e12,
        "unet_forward_backward_cfg_tflop": forward_backward / 1e12,
        "vae_decode_tflop": decode / 1e12,
        "per_sample_tflop": per_sample / 1e12,
        "run_flop": total,
        "a100_hours_at_100pct": total / 312e12 / 3600,
        "paper_implied_mfu": total / 312e12 / 3600 / PAPER_A100_HOURS,
    }


def bench_flops(pipe, args: BenchArgs, iteration: dict | None, device) -> dict:
    """FLOPs of an iteration at the benchmark's shapes, FLOP/s achieved by the iteration section (when it
    ran) and the paper's run in A100-hours at the measured (GPU) or assumed model FLOP utilisation."""
    latents, timestep, text = unet_inputs(pipe, args)
    forward, forward_backward = unet_flops(pipe.unet, latents, timestep, text)
    pipe.unet.requires_grad_(False)
    decode = count_flops(lambda: sampler.decode(pipe, latents[: args.batch_size]))
    flops = iteration_flops(
        forward, forward_backward, args.num_steps, args.train_timesteps, args.gradient_checkpointing
    )
    report = {
        "unet_forward_flop": forward,
        "unet_forward_backward_flop": forward_backward,
        "vae_decode_flop": decode,
        "iteration_flop": flops + decode,
        "paper": paper_cost(),
    }
    mfus = {"assumed_30pct": 0.3, "assumed_40pct": 0.4, "assumed_50pct": 0.5}
    if iteration is not None:
        seconds = iteration["seconds"]["seconds"]["median"]
        report["achieved_tflops"] = report["iteration_flop"] / seconds / 1e12
        if device.type == "cuda":
            report["fraction_of_peak"] = report["achieved_tflops"] / args.peak_tflops
            mfus = {"measured": report["fraction_of_peak"], **mfus}
    hours = report["paper"]["a100_hours_at_100pct"]
    report["paper_run_a100_hours"] = {name: hours / mfu for name, mfu in mfus.items()}
    return report


#### The report ####


def table(report: dict, args: BenchArgs) -> str:
    """The report as a markdown table: median [min .. max] of the rounds, and the issue's targets."""
    lines = [
        f"{args.model} on {report['device']}, {args.threads} thread(s), batch {args.batch_size}, "
        f"T={args.num_steps}, K={args.train_timesteps}, CFG {args.guidance}, "
        f"precision {args.mixed_precision}; median [min .. max] of {args.repeats} interleaved rounds",
        "",
        "| measure | value | target |",
        "|---|---|---|",
    ]
    if "sampler" in report:
        s = report["sampler"]
        lines += [
            f"| sample() / bare diffusers DDIM loop | {fmt(s['ratio'])} | <= 1.05 |",
            f"| sample() seconds | {fmt(s['seconds']['sample'])} | |",
        ]
    if "iteration" in report:
        it = report["iteration"]
        split = (it["seconds"][k]["median"] for k in ("seconds_sampling", "seconds_reward", "seconds_update"))
        lines += [
            f"| iteration / UNet floor | {fmt(it['ratio'])} | <= 1.10 |",
            f"| iteration seconds | {fmt(it['seconds']['seconds'])} | |",
            "| sampling / reward / update seconds | " + " / ".join(f"{x:.3g}" for x in split) + " | |",
            f"| floor seconds (T fwd + K fwd+bwd) | {fmt(it['floor_seconds'])} | |",
            f"| K optimizer steps (clip + fused AdamW) seconds | {fmt(it['optimizer_seconds'])} | |",
            f"| iteration / (floor + K optimizer steps) | {fmt(it['ratio_with_optimizer'])} | |",
            f"| samples/s, 1 process | {fmt(it['samples_per_second'])} | |",
        ]
    for row in report.get("memory", []):
        gc = "with" if row["gradient_checkpointing"] else "without"
        lines.append(
            f"| peak MB, K={row['train_timesteps']}, {gc} checkpointing | {row['peak_mb']:.1f} | flat in K |"
        )
    for n, rate in report.get("ddp", {}).items():
        if n == "efficiency_2":
            lines.append(f"| DDP scaling efficiency, 2 processes | {rate:.2f} | 1.0 |")
        else:
            lines.append(f"| samples/s, {n} DDP process(es) | {fmt(rate)} | |")
    for k, v in report.get("knobs", {}).items():
        if k not in ("default", "tf32"):
            lines.append(f"| UNet forward, {k} / default | {fmt(v['ratio'])} | < 1 to adopt |")
    if "flops" in report:
        fl, paper = report["flops"], report["flops"]["paper"]
        lines.append(
            f"| GFLOP per iteration (UNet calls + VAE decode) | {fl['iteration_flop'] / 1e9:.3g} | |"
        )
        if "achieved_tflops" in fl:
            lines.append(f"| achieved TFLOP/s | {fl['achieved_tflops']:.3g} | |")
        if "fraction_of_peak" in fl:
            lines.append(f"| fraction of GPU peak | {fl['fraction_of_peak']:.1%} | |")
        lines += [
            f"| paper run: TFLOP per sample (SD2 counted) | {paper['per_sample_tflop']:.1f} | |",
            f"| paper run at 100% of A100 peak, A100-hours | {paper['a100_hours_at_100pct']:.0f} | |",
            f"| paper's 1,550 A100-hours imply MFU | {paper['paper_implied_mfu']:.1%} | |",
        ]
        lines += [
            f"| paper run with our code at {k} MFU, A100-hours | {h:.0f} | |"
            for k, h in fl["paper_run_a100_hours"].items()
        ]
    return "\n".join(lines)


def main(args: BenchArgs) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # as train.py: TF32 matmuls and convolutions
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # The benchmark's own UNet calls in train.py's precision (train.main sets its autocast itself).
    # auto resolved as train.py resolves it, so that the report names what ran
    dtype = sampler.precision_dtype(args.mixed_precision, device)
    args.mixed_precision = next(name for name, d in sampler.DTYPES.items() if d == dtype)
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = device.type == "cuda"
    precision = contextlib.nullcontext()
    if dtype != torch.float32:
        precision = torch.autocast(device.type, dtype=dtype)
    pipe = sampler.load_pipeline(args.model, device=device)
    report = {"args": dataclasses.asdict(args), "device": str(device), "torch": torch.__version__}
    sections = args.sections.split(",")
    with tempfile.TemporaryDirectory() as tmp, precision:
        if "sampler" in sections:
            report["sampler"] = bench_sampler(pipe, args, device)
        if "iteration" in sections:
            report["iteration"] = bench_iteration(args, device, tmp)
        if "memory" in sections:
            report["memory"] = bench_memory(args, device, tmp)
        if "ddp" in sections:
            report["ddp"] = bench_ddp(args, tmp)
        if "knobs" in sections:
            report["knobs"] = bench_knobs(args, device)
    if "flops" in sections:
        report["flops"] = bench_flops(pipe, args, report.get("iteration"), device)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(table(report, args))
    return report


if __name__ == "__main__":
    main(parse_args())
