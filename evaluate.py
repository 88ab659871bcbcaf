"""Did fine-tuning work? Base model vs checkpoints in the terms of the paper's Tables 1, 3, 4 and 5.

The base model and every checkpoint generate images for the same prompts with the same seeds: image k of
a prompt set has seed `--seed + k` for every model, so paired images share their initial noise and the
noise of every DDIM step. Each suite's reward scores them; the numbers are
    pref        mean preference score (and aesthetic score) per prompt set    paper Table 1
    skin        statistical parity SP of each prompt's N images, averaged     paper Table 3 (lower: better)
    comp        mean detection score on seen and unseen object prompts        paper Table 4
    brightness, jpeg, color   the weight-free rewards' means (color: an SP)   CPU runs
plus, per checkpoint and prompt set, the WIN RATE: the share of (prompt, seed) pairs whose checkpoint image
gets a higher reward than the base image (ties count one half), with a 95% bootstrap interval over prompts -
the automatic stand-in for the paper's human study (80.3%). Given a joint model and single-task specialists,
Table 5 gives each metric's gain of the joint model as a percentage of its specialist's gain; given the
runs of several seeds (--joint a,b,c --specialist skin=x,y,z), also that of their means.

Outputs (images are cached: a second run only generates what is missing):
    OUT/results.json      every number, and per image its prompt, seed, file and reward
    OUT/results.md        the tables, ready to paste
    OUT/grids/SET/*.png   per prompt: base and each checkpoint side by side, captioned
    OUT/ab.html           a static A/B page for a human study; the votes download as JSON

Commands:
    # the paper's suites on Stable Diffusion 2 base and a train.py run (GPU, weights from the hub)
    python evaluate.py --model stabilityai/stable-diffusion-2-base --checkpoint runs/pref/final \\
        --suites pref,skin,comp --pref-prompts parti=parti.txt --device cuda --mixed-precision bf16 \\
        --out out/eval
    # Table 5: name the checkpoints, then say which is joint and which are the specialists
    python evaluate.py --model stabilityai/stable-diffusion-2-base --suites pref,skin,comp --device cuda \\
        --checkpoint joint=runs/joint/final --checkpoint pref=runs/pref/final \\
        --checkpoint skin=runs/skin/final --checkpoint comp=runs/comp/final \\
        --joint joint --specialist pref=pref --specialist skin=skin --specialist comp=comp --out out/table5
    # ... over seeds: label every seed's runs, list them in the same order (adds a row of the seed means)
    #     --joint joint-s0,joint-s1 --specialist pref=pref-s0,pref-s1 --specialist skin=skin-s0,skin-s1 ...
    # the toy world, CPU, minutes
    python evaluate.py --model toy --checkpoint runs/toy/pref/final --suites pref,skin,comp --out out/eval-toy
    # CPU smoke run: tiny random model, weight-free rewards, seconds
    python evaluate.py --model tiny --checkpoint runs/tiny/final --suites brightness,jpeg,color \\
        --num-steps 4 --max-prompts 4 --group-size 4 --out out/eval-tiny
    # a human study: open OUT/ab.html, vote, download; then
    python evaluate.py --tally votes-rater1.json votes-rater2.json
"""

import hashlib
import itertools
import json
import os
import re
import secrets
import sys
import textwrap
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

import rewards
import sampler
import toyworld
from flags import option, parse

#### Configuration ####


@dataclass(frozen=True)
class Suite:
    metric: str  # what the tables call the suite's number
    parity: bool  # the reward is -SP of each prompt's images: the metric is SP, lower is better
    takes_prompt_file: bool  # the task's prompts can come from --prompt-file (rewards.py)
    paper: str  # where the paper reports it


SUITES = {
    "pref": Suite("preference score", parity=False, takes_prompt_file=True, paper="paper Table 1"),
    "skin": Suite("statistical parity", parity=True, takes_prompt_file=False, paper="paper Table 3"),
    "comp": Suite("detection score", parity=False, takes_prompt_file=False, paper="paper Table 4"),
    "brightness": Suite("brightness", parity=False, takes_prompt_file=True, paper="weight-free"),
    "jpeg": Suite("jpeg reward (-kB)", parity=False, takes_prompt_file=True, paper="weight-free"),
    "color": Suite("colour parity (SP)", parity=True, takes_prompt_file=True, paper="weight-free"),
}
CONFIDENCE = 0.95
GRID_CELL = 160  # pixels per image in the grids
# the A/B page; write_ab_page fills in its placeholders __PAGE_ID__ and __PAIRS_JSON__
AB_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "ab_page.html")


@dataclass
class Args:
    model: str = option(
        sampler.PAPER_MODEL,
        'base model: a hub id or a diffusers folder of SD 1.x / 2.x (the paper\'s: SD2 base) or SDXL, "toy" '
        '(the toy world, offline) or "tiny" / "tiny-xl" (random weights)',
    )
    checkpoint: list[str] = option(
        None,
        "a train.py checkpoint folder (or its unet_ema/ or lora_ema/: the --ema-decay weights), or "
        "LABEL=FOLDER (repeatable); labelled by its folder name",
        action="append",
    )
    suites: str = option("pref,skin,comp", "comma list of: " + ", ".join(SUITES))
    out: str = option("out/eval", "output folder (images are cached here between runs)")
    prompt_file: str | None = option(
        None,
        "prompt file (one per line) of pref and the weight-free tasks, as in train.py; "
        "its held-out test split is evaluated",
    )
    pref_prompts: list[str] = option(
        None,
        "NAME=FILE: a whole prompt file as another pref prompt set, e.g. parti=parti.txt (repeatable)",
        action="append",
    )
    pref_rewards: str | None = option(
        None,
        "comma list of rewards scoring the pref images, the first one judges the win rate "
        '(default "pref,aesthetic": ImageReward and the aesthetic score, the paper\'s Table 1; "pref" with '
        '--model toy); add "pickscore" for PickScore as a further judge',
    )
    num_steps: int = option(50, "DDIM steps")
    guidance: float = option(7.0, "classifier-free guidance scale")
    eta: float = option(1.0, "DDIM eta (1.0: the stochastic sampler the model was trained with)")
    images_per_prompt: int = option(
        1, "images per prompt (seeds) for pref, comp, brightness, jpeg", at_least=1
    )
    group_size: int = option(
        16, "images per prompt for the SP suites (skin, color): SP's group, as train.py's", at_least=1
    )
    max_prompts: int = option(
        300, "at most this many prompts per prompt set (paper: 300 per comp set)", at_least=1
    )
    batch_size: int = option(8, "images per generation and reward batch", at_least=1)
    seed: int = option(0, "image k of a prompt set has seed SEED + k; also orders prompts and the A/B page")
    device: str = option("cuda" if torch.cuda.is_available() else "cpu", "torch device")
    mixed_precision: str = option(
        "auto", "pipeline dtype (auto: bf16 on CUDA, else fp32)", choices=sampler.PRECISIONS
    )
    joint: str | None = option(
        None,
        "Table 5: label of the jointly trained checkpoint, or comma-separated labels of several seeds' runs",
    )
    specialist: list[str] = option(
        None,
        "Table 5: SUITE=LABEL, the single-task checkpoint of SUITE (repeatable; with several --joint runs, "
        "one label per run in the same order: SUITE=L1,L2); by default read from the checkpoints' args.json",
        action="append",
    )
    grids: int = option(20, "grid PNGs per prompt set (the first prompts)")
    ab_pairs: int = option(400, "pairs on the A/B page (paper: 400 prompts)")
    resamples: int = option(10_000, "bootstrap resamples for the 95%% intervals", at_least=1)
    tally: list[str] = option(
        None, "votes JSON files of the A/B page: print the preference rates and exit", nargs="+"
    )


def parse_args(argv=None) -> Args:
    args, parser = parse(Args, __doc__, argv)
    for name in ("checkpoint", "pref_prompts", "specialist"):
        setattr(args, name, getattr(args, name) or [])
    unknown = [s for s in suite_names(args) if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; pick from {', '.join(SUITES)}")
    if args.mixed_precision == "auto":  # resolved here, so that the image cache keys name the dtype used
        dtype = sampler.precision_dtype("auto", args.device)
        args.mixed_precision = next(name for name, d in sampler.DTYPES.items() if d == dtype)
    if args.pref_rewards is None:
        args.pref_rewards = "pref" if toyworld.is_toy_model(args.model) else "pref,aesthetic"
    if not scorers_of(args, "pref"):
        parser.error('--pref-rewards needs at least one reward, e.g. "pref,aesthetic"')
    for name in scorers_of(args, "pref"):
        if name not in rewards.TASKS:
            known = ", ".join(sorted(rewards.TASKS))
            parser.error(f"unknown reward {name!r} in --pref-rewards; known rewards: {known}")
    if args.joint is not None and not all(args.joint.split(",")):
        parser.error(f"--joint {args.joint!r} must be a --checkpoint label, or several separated by commas")
    runs = len(args.joint.split(",")) if args.joint else 1  # without --joint: one run, its joint inferred
    if runs > 1 and not args.specialist:
        parser.error(
            f"--joint {args.joint!r} names {runs} runs: name each suite's specialists the same way, one per "
            "run in the same order, e.g. --specialist skin=skin-s0,skin-s1"
        )
    for spec in args.specialist:
        suite_name, _, labels = spec.partition("=")
        labels = labels.split(",")
        if not suite_name or not all(labels):
            parser.error(
                f"--specialist {spec!r} must be SUITE=LABEL: a suite of --suites and the --checkpoint label "
                "of its single-task checkpoint, e.g. --specialist skin=skin"
            )
        if len(labels) != runs:
            joint = f"--joint {args.joint!r} names {runs}" if args.joint else "without --joint there is 1"
            parser.error(
                f"--specialist {spec!r} names {len(labels)} run(s) but {joint}: give one specialist label "
                "per joint run, in the same order (seed by seed)"
            )
    if args.pref_prompts and toyworld.is_toy_model(args.model):
        parser.error(
            "--pref-prompts adds a prompt file (e.g. PartiPrompts) as a pref prompt set, but the toy world's "
            "pref reward only scores its own captions (it reads the objects to detect from their metadata); "
            "drop --pref-prompts with a toy-world --model, or pass a real --model"
        )
    return args


def suite_names(args: Args) -> list[str]:
    return [s.strip() for s in args.suites.split(",") if s.strip()]


def safe_name(text: str) -> str:
    """A label or set name as a file name."""
    return re.sub(r"[^\w.-]+", "_", text)


#### Checkpoints and prompt sets ####


def parse_checkpoints(specs: list[str]) -> dict[str, str]:
    """{label: folder} from "FOLDER" or "LABEL=FOLDER"; the label defaults to the folder's name, with the run
    folder in front for train.py's generic names ("pref-run/final")."""
    checkpoints = {}
    for spec in specs:
        label, path = spec.split("=", 1) if "=" in spec and not os.path.exists(spec) else (None, spec)
        path = os.path.normpath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint {path} is not a folder; pass a train.py checkpoint folder")
        if label is None:
            name = os.path.basename(path)
            generic = name == "final" or name.startswith("checkpoint-")
            label = f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}/{name}" if generic else name
        if label == "base" or label in checkpoints:
            raise ValueError(f"checkpoint label {label!r} is taken; name it with --checkpoint LABEL={path}")
        checkpoints[label] = path
    return checkpoints


def train_args(checkpoint: str) -> dict:
    """The training args a train.py checkpoint saved in args.json ({} when it has none)."""
    path = os.path.join(checkpoint, "args.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def trained_rewards(checkpoint: str) -> list[str]:
    """The rewards a checkpoint was trained on (a list or a comma string in args.json; empty when unknown)."""
    trained = train_args(checkpoint).get("rewards", [])
    return [r.strip() for r in trained.split(",")] if isinstance(trained, str) else list(trained)


@dataclass
class PromptSet:
    name: str  # "pref/test", "pref/parti", "skin/occupations", ...
    suite: str
    prompts: list[str]
    metadata: list[dict]  # one per prompt, from the task's prompt source
    images_per_prompt: int

    def images(self, seed: int) -> list[tuple[int, str, int]]:
        """(prompt index, prompt, seed) of each image k = prompt index * images_per_prompt + j."""
        n = self.images_per_prompt
        return [(k // n, self.prompts[k // n], seed + k) for k in range(len(self.prompts) * n)]


def build_prompt_sets(args: Args) -> list[PromptSet]:
    """Every evaluated (suite, split): the task's held-out splits (its only split when it has one), and for
    pref each --pref-prompts file as a whole."""
    prompt_sets = []
    for suite_name in suite_names(args):
        suite = SUITES[suite_name]
        prompt_file = args.prompt_file if suite.takes_prompt_file else None
        task = toyworld.load_task(suite_name, args.model, args.device, prompt_file)
        n = args.group_size if suite.parity else args.images_per_prompt
        for split in task.splits[1:] or task.splits:
            items = list(itertools.islice(task.prompts(split, args.seed), args.max_prompts))
            if not items:
                raise ValueError(f"{suite_name}/{split} has no prompts; give a longer --prompt-file")
            prompts, metadata = zip(*items, strict=True)
            prompt_sets.append(
                PromptSet(f"{suite_name}/{split}", suite_name, list(prompts), list(metadata), n)
            )
        if suite_name == "pref":
            for spec in args.pref_prompts:
                name, path = (
                    spec.split("=", 1) if "=" in spec else (os.path.splitext(os.path.basename(spec))[0], spec)
                )
                prompts = rewards.read_prompt_file(path)[: args.max_prompts]
                prompt_sets.append(PromptSet(f"pref/{name}", "pref", prompts, [{} for _ in prompts], n))
    return prompt_sets


#### Generation: same prompts, same seeds, cached ####


def checkpoint_fingerprint(checkpoint: str | None) -> list:
    """Names, sizes and times of a checkpoint's (or a model folder's) files: retraining invalidates its
    cached images."""
    if checkpoint is None:
        return []
    found = []
    for root, _, files in sorted(os.walk(checkpoint)):
        for name in sorted(files):
            stat = os.stat(os.path.join(root, name))
            found.append(
                [os.path.relpath(os.path.join(root, name), checkpoint), stat.st_size, stat.st_mtime_ns]
            )
    return found


def model_fingerprint(model: str) -> str | list:
    """The base model in the image cache key: a local folder (the toy model's for "toy") by its name and its
    files' fingerprint, so re-pretraining it or changing its weights invalidates its images; models built in
    code ("tiny", "tiny-xl") and hub ids by their name."""
    folder = sampler.TOY_MODEL_DIR if model == "toy" else model
    if model in sampler.BUILT_IN or not os.path.isdir(folder):
        return model
    return [model, checkpoint_fingerprint(folder)]


def generate_images(args: Args, label: str, checkpoint: str | None, prompt_sets: list[PromptSet]) -> dict:
    """{set name: [PNG path relative to OUT] per image}. Only images missing from the cache are generated,
    and the model is loaded only if some are; a file name holds a hash of all its image depends on."""
    settings = [
        model_fingerprint(args.model),
        checkpoint_fingerprint(checkpoint),
        args.num_steps,
        args.guidance,
        args.eta,
        args.mixed_precision,
    ]
    files, missing = {}, []
    for prompt_set in prompt_sets:
        folder = os.path.join("images", safe_name(label), safe_name(prompt_set.name))
        files[prompt_set.name] = []
        for k, (_, prompt, seed) in enumerate(prompt_set.images(args.seed)):
            key = hashlib.sha1(json.dumps([*settings, prompt, seed]).encode()).hexdigest()[:10]
            path = os.path.join(folder, f"{k:05d}-{key}.png")
            files[prompt_set.name].append(path)
            if not os.path.isfile(os.path.join(args.out, path)):
                missing.append((path, prompt, seed))
    if not missing:
        return files

    pipe = sampler.load_pipeline(args.model, args.device, sampler.DTYPES[args.mixed_precision], checkpoint)
    with tqdm(total=len(missing), desc=f"generating {label}", unit="image") as progress:
        for start in range(0, len(missing), args.batch_size):
            batch = missing[start : start + args.batch_size]
            # one generator per image: image k depends on its own seed only, whatever batch it is in
            generator = [torch.Generator().manual_seed(seed) for _, _, seed in batch]
            images = sampler.sample(
                pipe, [p for _, p, _ in batch], args.num_steps, args.guidance, args.eta, generator=generator
            )["images"]  # (B, 3, H, W) in [0, 1]
            for (path, _, _), image in zip(batch, images, strict=True):
                save_png(image, os.path.join(args.out, path))
            progress.update(len(batch))
    return files


def save_png(image: torch.Tensor, path: str) -> None:
    """(3, H, W) in [0, 1] -> PNG, written whole or not at all (an interrupted run leaves no broken cache)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rewards.to_uint8_arrays(image[None])[0]).save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)


def load_images(out: str, paths: list[str]) -> torch.Tensor:
    """PNGs -> (B, 3, H, W) float in [0, 1]. Every score is computed on the saved 8-bit images, so a cached
    rerun scores exactly what the first run scored."""
    arrays = [np.asarray(Image.open(os.path.join(out, p)).convert("RGB")) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


#### Scoring ####


def score_images(task: rewards.Task, prompt_set: PromptSet, paths: list[str], args: Args):
    """Rewards (K,) of a prompt set's images and the reward's info averaged over images. Batches hold whole
    prompts; metadata "group" is the prompt index, so a minibatch reward sees all N images of a prompt."""
    n = prompt_set.images_per_prompt
    prompts_per_batch = max(1, args.batch_size // n)
    scores, infos = [], []
    for first in range(0, len(prompt_set.prompts), prompts_per_batch):
        indices = range(first, min(first + prompts_per_batch, len(prompt_set.prompts)))
        images = load_images(args.out, [paths[p * n + j] for p in indices for j in range(n)])
        prompts = [prompt_set.prompts[p] for p in indices for _ in range(n)]
        metadata = [{**prompt_set.metadata[p], "group": p} for p in indices for _ in range(n)]
        batch_rewards, info = task.reward(images.to(args.device), prompts, metadata)
        scores.append(batch_rewards.float().cpu().numpy())
        infos.append((len(prompts), info))
    keys = set.intersection(*(set(info) for _, info in infos))
    info = {key: sum(size * info[key] for size, info in infos) / len(paths) for key in sorted(keys)}
    return np.concatenate(scores), info


def scorers_of(args: Args, suite_name: str) -> list[str]:
    """The rewards that score a suite's images; the first one is the suite's metric and judges win rates."""
    if suite_name != "pref":
        return [suite_name]
    return [r.strip() for r in args.pref_rewards.split(",") if r.strip()]


#### Metrics ####


def bootstrap_ci(values, resamples: int = 10_000, confidence: float = CONFIDENCE, seed: int = 0):
    """Percentile bootstrap interval (low, high) of the mean of `values`, one value per independent unit
    (here: per prompt). Seeded, so a report is reproducible."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-d array of per-unit values")
    rng = np.random.default_rng(seed)
    means = np.concatenate(
        [
            values[rng.integers(0, len(values), size=(size, len(values)))].mean(axis=1)
            for size in np.diff(
                [*range(0, resamples, 1000), resamples]
            )  # 1000 resamples at a time: bounded memory
        ]
    )
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def per_prompt(values: np.ndarray, images_per_prompt: int) -> np.ndarray:
    """(K,) values of images k = prompt * N + j -> (K / N,) per-prompt means."""
    return np.asarray(values, dtype=np.float64).reshape(-1, images_per_prompt).mean(axis=1)


def suite_metric(rewards_: np.ndarray, images_per_prompt: int, parity: bool) -> np.ndarray:
    """The suite's metric per prompt: the mean reward of its images, or for a parity reward (-SP, shared by
    the prompt's images) the statistical parity SP = -reward (paper Table 3: lower is better)."""
    return per_prompt(-rewards_ if parity else rewards_, images_per_prompt)


def mean_with_ci(per_prompt_values: np.ndarray, args: Args) -> dict:
    return {
        "mean": float(per_prompt_values.mean()),
        "ci": bootstrap_ci(per_prompt_values, args.resamples, seed=args.seed),
    }


def wins(checkpoint_rewards: np.ndarray, base_rewards: np.ndarray) -> np.ndarray:
    """Per paired image: 1 if the checkpoint's image has the higher reward, 0 if the base's, 1/2 for a tie."""
    return np.where(
        checkpoint_rewards > base_rewards, 1.0, np.where(checkpoint_rewards == base_rewards, 0.5, 0.0)
    )


def win_rate(
    checkpoint_rewards, base_rewards, images_per_prompt: int, resamples: int = 10_000, seed: int = 0
):
    """Share of (prompt, seed) pairs the checkpoint wins (ties count 1/2), with a bootstrap interval that
    resamples prompts (a prompt's images are not independent of each other)."""
    won = wins(np.asarray(checkpoint_rewards), np.asarray(base_rewards))
    by_prompt = per_prompt(won, images_per_prompt)
    return {
        "rate": float(by_prompt.mean()),
        "ci": bootstrap_ci(by_prompt, resamples, seed=seed),
        "ties": float((won == 0.5).mean()),
        "pairs": len(won),
    }


def joint_gain_percent(base: float, joint: float, specialist: float, lower_is_better: bool) -> float | None:
    """Table 5: the joint model's gain over base as a percentage of the specialist's gain,
    100 * (joint - base) / (specialist - base), gains counted downwards for SP. None when the specialist
    did not improve on base (no gain to be a percentage of)."""
    sign = -1.0 if lower_is_better else 1.0
    specialist_gain = sign * (specialist - base)
    if specialist_gain <= 0:
        return None
    return 100.0 * sign * (joint - base) / specialist_gain


def table5_roles(args: Args, checkpoints: dict[str, str]) -> tuple[list[str], dict[str, list[str]]]:
    """([joint label per run], {suite: [specialist label per run]}) from --joint / --specialist, else one run
    from the checkpoints' args.json: the one checkpoint trained on several evaluated rewards is the joint
    model, and a checkpoint trained on one of them alone is that reward's specialist. Several runs are
    seeds: run i's joint model is compared with run i's specialists. ([], {}) when there is no Table 5."""
    evaluated = set(suite_names(args))
    trained = {label: set(trained_rewards(path)) & evaluated for label, path in checkpoints.items()}
    if args.joint is not None:
        joint = args.joint.split(",")
    else:
        several = [label for label, tasks in trained.items() if len(tasks) > 1]
        joint = several[:1] if len(several) == 1 else []
    specialists = {}
    for spec in args.specialist:
        suite_name, _, labels = spec.partition("=")
        specialists[suite_name] = labels.split(",")
    if joint and not specialists:
        for label, tasks in trained.items():
            if len(tasks) == 1 and label not in joint:
                specialists.setdefault(next(iter(tasks)), [label])
    for label in [*joint, *(label for labels in specialists.values() for label in labels)]:
        if label not in checkpoints:
            raise ValueError(f"Table 5 label {label!r} is not a checkpoint; labels: {', '.join(checkpoints)}")
    for suite_name in specialists:
        if suite_name not in evaluated:
            raise ValueError(f"--specialist {suite_name}=... names a suite not in --suites {args.suites}")
    return (joint, specialists) if joint and specialists else ([], {})


def table5(results: dict, joint: list[str], specialists: dict[str, list[str]]) -> list[dict]:
    """One row per metric of a specialist's suite: every model's value, each run's joint-as-%-of-specialist
    and, for several runs (seeds), the same for the mean of the joint models over the mean of the
    specialists (the means average a seed's noise down; a ratio of two noisy gains does not)."""
    rows = []
    for set_name, result in results["sets"].items():
        if result["suite"] not in specialists:
            continue
        runs = list(zip(joint, specialists[result["suite"]], strict=True))
        for scored in result["scores"].values():
            value = {label: v["mean"] for label, v in scored["value"].items()}
            lower = scored["lower_is_better"]
            row = {
                "set": set_name,
                "metric": scored["metric"],
                "lower_is_better": lower,
                "joint": joint,
                "specialist": specialists[result["suite"]],
                "value": value,
                "joint_percent": [
                    joint_gain_percent(value["base"], value[j], value[sp], lower) for j, sp in runs
                ],
            }
            if len(runs) > 1:
                joint_mean = float(np.mean([value[j] for j, _ in runs]))
                specialist_mean = float(np.mean([value[sp] for _, sp in runs]))
                row["mean"] = {
                    "joint": joint_mean,
                    "specialist": specialist_mean,
                    "joint_percent": joint_gain_percent(value["base"], joint_mean, specialist_mean, lower),
                }
            rows.append(row)
    return rows


#### Evaluation ####


def score_prompt_set(args: Args, ps: PromptSet, files: dict[str, list[str]], scorers: dict) -> dict:
    """Every model's rewards on one prompt set from each of the suite's scorers, the metric per model with
    its interval, and each checkpoint's win rate against base judged by the suite's first scorer."""
    suite = SUITES[ps.suite]
    result = {
        "suite": ps.suite,
        "images_per_prompt": ps.images_per_prompt,
        "prompts": ps.prompts,
        "seeds": [seed for _, _, seed in ps.images(args.seed)],
        "files": files,
        "scores": {},
        "win_rate": {},
    }
    for i, scorer in enumerate(scorers_of(args, ps.suite)):
        parity = suite.parity and i == 0
        scored = {
            "metric": suite.metric if i == 0 else f"{scorer} score",
            "lower_is_better": parity,
            "rewards": {},
            "value": {},
            "info": {},
        }
        for label, paths in tqdm(files.items(), desc=f"scoring {ps.name} with {scorer}", leave=False):
            scores, info = score_images(scorers[scorer], ps, paths, args)
            scored["rewards"][label] = scores.tolist()
            scored["value"][label] = mean_with_ci(suite_metric(scores, ps.images_per_prompt, parity), args)
            scored["info"][label] = info
        result["scores"][scorer] = scored
    judge = next(iter(result["scores"].values()))["rewards"]
    for label in files:
        if label != "base":
            result["win_rate"][label] = win_rate(
                judge[label], judge["base"], ps.images_per_prompt, args.resamples, args.seed
            )
    return result


def evaluate(args: Args) -> dict:
    checkpoints = parse_checkpoints(args.checkpoint)
    for label, path in checkpoints.items():
        trained_from = train_args(path).get("model")
        if trained_from is not None and trained_from != args.model:
            print(
                f"warning: {label} was trained from {trained_from!r}, compared here with base {args.model!r}"
            )
    joint, specialists = table5_roles(args, checkpoints)
    prompt_sets = build_prompt_sets(args)
    # built and loaded before generation, so that a scorer that cannot work (or be fetched) stops us here
    names = dict.fromkeys(name for ps in prompt_sets for name in scorers_of(args, ps.suite))
    scorers = {name: toyworld.load_task(name, args.model, args.device) for name in names}
    for task in scorers.values():
        task.load()

    #### GENERATION ####
    models = {"base": None, **checkpoints}
    files = {label: generate_images(args, label, path, prompt_sets) for label, path in models.items()}

    #### SCORING ####
    results = {"settings": asdict(args), "checkpoints": checkpoints, "sets": {}}
    for ps in prompt_sets:
        results["sets"][ps.name] = score_prompt_set(
            args, ps, {label: f[ps.name] for label, f in files.items()}, scorers
        )
    results["table5"] = (
        {"joint": joint, "specialists": specialists, "rows": table5(results, joint, specialists)}
        if joint
        else None
    )
    return results


#### Reports: markdown, grids, A/B page ####


def fmt(value: dict) -> str:
    low, high = value["ci"]
    return f"{value['mean']:.3f} [{low:.3f}, {high:.3f}]"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]


def suite_table(sets: dict, labels: list[str]) -> list[str]:
    """Per model: each set's metric per scorer with its interval, then the scorers' own diagnostics (their
    info, averaged over images), e.g. the share of images in which the skin reward found a person."""
    metrics = [(name, sc) for name, r in sets.items() for sc in r["scores"]]
    details = [(name, sc, key) for name, sc in metrics for key in sets[name]["scores"][sc]["info"]["base"]]
    header = ["model", *(f"{name} {sets[name]['scores'][sc]['metric']}" for name, sc in metrics)]
    header += [f"{name} {sc}: {key}" for name, sc, key in details]
    rows = [
        [
            label,
            *(fmt(sets[name]["scores"][sc]["value"][label]) for name, sc in metrics),
            *(
                f"{sets[name]['scores'][sc]['info'][label].get(key, float('nan')):.3f}"
                for name, sc, key in details
            ),
        ]
        for label in labels
    ]
    return markdown_table(header, rows)


def table5_report(t5: dict) -> list[str]:
    """Every model's value of each specialist's metric, and the joint model's gain as a % of the specialist's
    (per run; with several runs also that of their means)."""
    rows, joints = t5["rows"], t5["joint"]
    several = len(joints) > 1

    def percent(value, specialist):
        return "n/a" if value is None else f"{value:.0f}% of {specialist}"

    specialists = "; ".join(
        f"{suite} " + ", ".join(f"`{label}`" for label in labels)
        for suite, labels in t5["specialists"].items()
    )
    lines = [
        "## Joint training (paper Table 5)",
        "",
        ("Joint models (one per run) " if several else "Joint model ")
        + ", ".join(f"`{label}`" for label in joints)
        + f"; specialists: {specialists}. % of specialist gain: 100 * (joint - base) / (specialist - base), "
        "gains in SP counted downwards; n/a: the specialist did not improve on base."
        + (
            " Run i's joint model is compared with run i's specialists, then the means over runs."
            if several
            else ""
        ),
        "",
    ]
    header = ["model"] + [
        f"{r['set']} {r['metric']} ({'lower' if r['lower_is_better'] else 'higher'} is better)" for r in rows
    ]
    models = ["base", *dict.fromkeys(label for r in rows for label in r["specialist"]), *joints]
    table = [[label, *(f"{r['value'][label]:.3f}" for r in rows)] for label in models]
    table += [
        [f"{joint if several else 'joint'}, % of specialist gain"]
        + [percent(r["joint_percent"][i], r["specialist"][i]) for r in rows]
        for i, joint in enumerate(joints)
    ]
    if several:
        table += [
            [f"mean of the {len(joints)} specialists", *(f"{r['mean']['specialist']:.3f}" for r in rows)],
            [f"mean of the {len(joints)} joint models", *(f"{r['mean']['joint']:.3f}" for r in rows)],
            ["mean joint, % of mean specialist gain"]
            + [percent(r["mean"]["joint_percent"], "the mean") for r in rows],
        ]
    return lines + markdown_table(header, table)


def markdown_report(results: dict) -> str:
    """results.md: per suite each model's metric with its interval, the win rates against base, Table 5."""
    s = results["settings"]
    labels = ["base", *results["checkpoints"]]
    checkpoints = ", ".join(f"`{label}` ({path})" for label, path in results["checkpoints"].items())
    lines = [
        "# Evaluation",
        "",
        f"Base model `{s['model']}`; checkpoints: {checkpoints or 'none'}. DDIM {s['num_steps']} steps, "
        f"eta {s['eta']}, guidance {s['guidance']}; image k of a prompt set has seed {s['seed']} + k in "
        f"every model. Values: mean over prompts [{CONFIDENCE:.0%} bootstrap interval over prompts]; columns "
        "`SET REWARD: KEY`: the reward's own diagnostics, averaged over images.",
        "",
    ]
    for suite_name in dict.fromkeys(r["suite"] for r in results["sets"].values()):
        suite = SUITES[suite_name]
        sets = {name: r for name, r in results["sets"].items() if r["suite"] == suite_name}
        n = next(iter(sets.values()))["images_per_prompt"]
        how = "lower is better" if suite.parity else "higher is better"
        lines += [
            f"## {suite_name}: {suite.metric} ({how}; {suite.paper})",
            "",
            ", ".join(f"{name}: {len(r['prompts'])} prompts" for name, r in sets.items())
            + f"; {n} image(s) per prompt"
            + (", SP taken over each prompt's images." if suite.parity else "."),
            "",
            *suite_table(sets, labels),
        ]
    if results["checkpoints"]:
        lines += [
            "## Win rate against base",
            "",
            "Share of (prompt, seed) pairs in which the judge rewards the checkpoint's image above base's "
            "(ties count one half; for an SP suite: share of prompts with a lower SP). With the preference "
            "model as judge it stands in for the paper's human study (80.3% preferred over SD2).",
            "",
        ]
        header = ["checkpoint", "prompt set", "judge", "win rate", "95% CI", "ties", "pairs"]
        rows = [
            [label, name, next(iter(r["scores"])), f"{w['rate']:.1%}",
             f"[{w['ci'][0]:.1%}, {w['ci'][1]:.1%}]", f"{w['ties']:.1%}", str(w["pairs"])]
            for name, r in results["sets"].items()
            for label, w in r["win_rate"].items()
        ]  # fmt: skip
        lines += markdown_table(header, rows)
    if results["table5"] is not None:
        lines += table5_report(results["table5"])
    return "\n".join(lines)


def font(size: int):
    return ImageFont.load_default(size=size)


def write_grids(results: dict, out: str, max_prompts: int) -> None:
    """Per prompt: a row per model (base first) holding its images, one column per seed, captioned with the
    prompt, the seeds, the model and its value of the suite's metric for that prompt."""
    label_width = 220
    for name, r in results["sets"].items():
        n = r["images_per_prompt"]
        scored = next(iter(r["scores"].values()))
        width = label_width + n * GRID_CELL
        for p, prompt in enumerate(r["prompts"][:max_prompts]):
            prompt_lines = textwrap.wrap(prompt, max(20, width // 9))[:4]
            header = 16 + 20 * len(prompt_lines) + 22
            rows = list(r["files"])
            grid = Image.new("RGB", (width, header + len(rows) * GRID_CELL), "white")
            draw = ImageDraw.Draw(grid)
            draw.multiline_text((8, 10), "\n".join(prompt_lines), fill="black", font=font(16))
            for j in range(n):
                draw.text(
                    (label_width + j * GRID_CELL, header - 20),
                    f"seed {r['seeds'][p * n + j]}",
                    fill="dimgray",
                    font=font(13),
                )
            for row, label in enumerate(rows):
                top = header + row * GRID_CELL
                rewards_ = np.array(scored["rewards"][label][p * n : (p + 1) * n])
                value = suite_metric(rewards_, n, scored["lower_is_better"])[0]
                draw.text((8, top + 8), label, fill="black", font=font(15))
                draw.text((8, top + 30), f"{scored['metric']}\n{value:.3f}", fill="dimgray", font=font(13))
                for j in range(n):
                    image = Image.open(os.path.join(out, r["files"][label][p * n + j])).convert("RGB")
                    cell = image.resize((GRID_CELL - 4, GRID_CELL - 4))
                    grid.paste(cell, (label_width + j * GRID_CELL, top + 2))
            path = os.path.join(out, "grids", safe_name(name), f"{p:04d}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            grid.save(path)


def write_ab_page(results: dict, out: str, max_pairs: int, seed: int) -> int:
    """OUT/ab.html: pairs (base image, checkpoint image) of the same prompt and seed, in random order and on
    random sides, images referenced relative to the page. Pairs come from the pref sets when pref was
    evaluated, else from every set. Returns the number of pairs."""
    sets = {name: r for name, r in results["sets"].items() if r["suite"] == "pref"} or results["sets"]
    pairs = [
        {
            "id": f"{label}|{name}|{seed_k}",
            "set": name,
            "seed": seed_k,
            "checkpoint": label,
            "prompt": r["prompts"][k // r["images_per_prompt"]],
            "base": r["files"]["base"][k],
            "candidate": r["files"][label][k],
        }
        for name, r in sets.items()
        for label in results["checkpoints"]
        for k, seed_k in enumerate(r["seeds"])
    ]
    rng = np.random.default_rng(seed)
    pairs = [pairs[i] for i in rng.permutation(len(pairs))[:max_pairs]]
    for pair in pairs:
        sides = [("base", pair.pop("base")), ("checkpoint", pair.pop("candidate"))]
        if rng.random() < 0.5:
            sides.reverse()
        (pair["left_model"], pair["left"]), (pair["right_model"], pair["right"]) = sides
    with open(AB_TEMPLATE, encoding="utf-8") as f:
        page = f.read()
    page = page.replace("__PAGE_ID__", secrets.token_hex(8)).replace(
        "__PAIRS_JSON__", json.dumps(pairs, indent=1).replace("</", "<\\/")
    )  # no "</script>" inside the script
    with open(os.path.join(out, "ab.html"), "w", encoding="utf-8") as f:
        f.write(page)
    return len(pairs)


def tally(paths: list[str], resamples: int = 10_000, seed: int = 0) -> list[dict]:
    """Human preference rate of each checkpoint over base from A/B votes (several raters' files may repeat a
    pair): per pair the share of votes for the checkpoint, averaged over pairs, with a bootstrap interval over
    pairs. One row per checkpoint and prompt set, then per checkpoint over all sets ("all")."""
    votes = []
    for path in paths:
        with open(path) as f:
            votes += json.load(f)["votes"]
    if not votes:
        raise ValueError(f"no votes in {', '.join(paths)}")
    rows = []
    for checkpoint in dict.fromkeys(v["checkpoint"] for v in votes):
        mine = [v for v in votes if v["checkpoint"] == checkpoint]
        for set_name in [*dict.fromkeys(v["set"] for v in mine), "all"]:
            chosen = [v for v in mine if set_name in ("all", v["set"])]
            by_pair = {}
            for v in chosen:
                by_pair.setdefault(v["pair"], []).append(v["winner"] == "checkpoint")
            per_pair = np.array([np.mean(x) for x in by_pair.values()])
            rows.append(
                {
                    "checkpoint": checkpoint,
                    "set": set_name,
                    "votes": len(chosen),
                    "pairs": len(per_pair),
                    "rate": float(per_pair.mean()),
                    "ci": bootstrap_ci(per_pair, resamples, seed=seed),
                }
            )
    return rows


def tally_markdown(rows: list[dict]) -> str:
    header = ["checkpoint", "prompt set", "votes", "pairs", "preferred over base", "95% CI"]
    table = [
        [r["checkpoint"], r["set"], str(r["votes"]), str(r["pairs"]), f"{r['rate']:.1%}",
         f"[{r['ci'][0]:.1%}, {r['ci'][1]:.1%}]"]
        for r in rows
    ]  # fmt: skip
    return "\n".join(markdown_table(header, table)[:-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.tally:
        print(tally_markdown(tally(args.tally, args.resamples, args.seed)))
        return
    try:  # offline with no cached copy of --model or of a reward model: one line, before any work
        sampler.check_model(args.model)
        os.makedirs(args.out, exist_ok=True)
        results = evaluate(args)
    except (ValueError, OSError, ImportError) as error:  # the command, the files it names, a missing package
        print("evaluate.py: error:", " ".join(str(error).split()), file=sys.stderr)
        sys.exit(2)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    report = markdown_report(results)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(report)
    write_grids(results, args.out, args.grids)
    num_pairs = write_ab_page(results, args.out, args.ab_pairs, args.seed)
    print(report)
    print(f"wrote {args.out}/results.json, results.md, grids/ and ab.html ({num_pairs} pairs)")


if __name__ == "__main__":
    main()
