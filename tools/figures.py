"""The README's figures, built from run folders with PIL alone (no plotting library). Not part of the method.

    # base vs fine-tuned images of the same prompts and seeds, from an evaluate.py output folder
    python tools/figures.py images runs/toy-skin-eval --set skin/occupations --prompts 4 --images 8 \\
        --row base="base model" --row toy-skin/final="RL on skin, 10 iterations" \\
        --out docs/images/skin-portraits.png
    # training reward per iteration, one panel per task, from train.py run folders (metrics.jsonl)
    python tools/figures.py curves skin=runs/toy/skin pref=runs/toy/pref comp=runs/toy/comp \\
        joint+L_pre=runs/toy/joint-pre --out docs/images/reward-curves.png

`images` reads OUT/results.json of evaluate.py: per prompt set, the prompts, each model's image files (image
k = prompt * N + j, paired across models by seed) and their rewards. The toy world's 32x32 images are
enlarged by nearest-neighbour upscaling, so every pixel stays visible as it was generated.
"""

import argparse
import json
import math
import os

from PIL import Image, ImageDraw, ImageFont

INK, GREY, LIGHT = (20, 20, 20), (110, 110, 110), (225, 225, 225)
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
GAP = 2  # pixels between images


def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


#### Base vs fine-tuned images ####


def image_figure(
    results: dict, root: str, set_name: str, rows: dict[str, str], prompts: int, images: int, scale: int
) -> tuple[Image.Image, dict[tuple[str, int], tuple[int, int, int, int]]]:
    """Per prompt: its text, then one row per model (`rows`: label -> title) of its first `images` images,
    each scaled `scale` times by nearest neighbour, and the model's value of the suite's metric on the prompt.
    Returns the figure and the box of every shown image, keyed by (label, image index k)."""
    r = results["sets"][set_name]
    n = r["images_per_prompt"]
    scored = next(iter(r["scores"].values()))  # the suite's metric: SP for skin, the detection score for comp
    short = "SP" if scored["lower_is_better"] else "score"
    first = Image.open(os.path.join(root, r["files"][next(iter(rows))][0]))
    cell = first.width * scale
    label_width, header, row_height = 190, 26, cell + GAP
    shown = min(images, n)
    width = label_width + shown * (cell + GAP)
    title_height = 34
    block = header + len(rows) * row_height + 10
    count = min(prompts, len(r["prompts"]))
    figure = Image.new("RGB", (width, title_height + count * block), "white")
    draw = ImageDraw.Draw(figure)
    means = "   ".join(f"{title} {scored['value'][label]['mean']:.3f}" for label, title in rows.items())
    better = " (lower is better)" if scored["lower_is_better"] else ""
    heading = f"{scored['metric']}{better}, mean of all {len(r['prompts'])} prompts:  {means}"
    draw.text((6, 8), heading, INK, font(15))
    boxes = {}
    for p in range(count):
        top = title_height + p * block
        draw.text((6, top + 4), r["prompts"][p], INK, font(16))
        for i, (label, title) in enumerate(rows.items()):
            y = top + header + i * row_height
            values = scored["rewards"][label][p * n : (p + 1) * n]  # the prompt's N images
            value = -sum(values) / n if scored["lower_is_better"] else sum(values) / n
            draw.text((6, y + cell // 2 - 18), title, INK, font(14))
            draw.text((6, y + cell // 2 + 2), f"{short} {value:.3f}", GREY, font(13))
            for j in range(shown):
                k = p * n + j
                image = Image.open(os.path.join(root, r["files"][label][k])).convert("RGB")
                x = label_width + j * (cell + GAP)
                figure.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
                boxes[(label, k)] = (x, y, x + cell, y + cell)
    return figure, boxes


#### Reward curves ####


def read_curves(folder: str) -> dict[str, list[tuple[int, float]]]:
    """{task: [(iteration, reward_mean)]} from a train.py run's metrics.jsonl (L_pre rows and rows of a
    skipped update, which carry no reward_mean, left out)."""
    curves = {}
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row.get("task") != "pretrain" and "reward_mean" in row:
                curves.setdefault(row["task"], []).append((row["iteration"], row["reward_mean"]))
    return curves


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if high <= low:
        high = low + 1e-3
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    start = math.floor(low / step) * step
    return [start + i * step for i in range(int(math.ceil((high - start) / step)) + 1)]


def curves_figure(runs: dict[str, dict[str, list[tuple[int, float]]]], panel: tuple[int, int] = (300, 220)):
    """One panel per task (in order of first appearance): reward_mean per iteration of every run that
    trained the task, one colour per run, with a legend below."""
    tasks = list(dict.fromkeys(task for curves in runs.values() for task in curves))
    colors = {name: COLORS[i % len(COLORS)] for i, name in enumerate(runs)}
    pw, ph = panel
    left, right, top, bottom = 52, 12, 28, 34
    legend = 30
    figure = Image.new("RGB", (len(tasks) * pw, ph + legend), "white")
    draw = ImageDraw.Draw(figure)
    for t, task in enumerate(tasks):
        x0, x1, y0, y1 = t * pw + left, (t + 1) * pw - right, top, ph - bottom
        points = [p for curves in runs.values() for p in curves.get(task, [])]
        iterations = [i for i, _ in points]
        ticks = nice_ticks(min(v for _, v in points), max(v for _, v in points))
        xmin, xmax = min(iterations), max(max(iterations), min(iterations) + 1)

        def xy(i, v, ticks=ticks, xmin=xmin, xmax=xmax, x0=x0, x1=x1, y0=y0, y1=y1):
            x = x0 + (i - xmin) / (xmax - xmin) * (x1 - x0)
            y = y1 - (v - ticks[0]) / (ticks[-1] - ticks[0]) * (y1 - y0)
            return x, y

        for tick in ticks:
            _, y = xy(xmin, tick)
            draw.line([(x0, y), (x1, y)], LIGHT)
            draw.text((x0 - 6, y), f"{tick:.2f}", GREY, font(11), anchor="rm")
        for i in sorted({xmin, xmax, *range(xmin, xmax + 1, max(1, (xmax - xmin) // 4 or 1))}):
            x, _ = xy(i, ticks[0])
            draw.text((x, y1 + 6), str(i), GREY, font(11), anchor="mt")
        draw.rectangle([x0, y0, x1, y1], outline=GREY)
        draw.text(((x0 + x1) / 2, 8), f"{task}: training reward", INK, font(13), anchor="mt")
        draw.text(((x0 + x1) / 2, ph - 12), "iteration", GREY, font(11), anchor="mt")
        for name, curves in runs.items():
            line = [xy(i, v) for i, v in sorted(curves.get(task, []))]
            if len(line) > 1:
                draw.line(line, colors[name], width=2)
            for x, y in line:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colors[name])
    x = 10
    for name, color in colors.items():
        draw.line([(x, ph + 15), (x + 22, ph + 15)], color, width=3)
        draw.text((x + 28, ph + 15), name, INK, font(12), anchor="lm")
        x += 40 + int(draw.textlength(name, font(12)))
    return figure


#### Command line ####


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    images = commands.add_parser("images", help="base vs fine-tuned images from an evaluate.py output folder")
    images.add_argument("eval", help="evaluate.py --out folder (holds results.json)")
    images.add_argument("--set", default="skin/occupations", help="prompt set, as in results.json")
    images.add_argument(
        "--row",
        action="append",
        default=None,
        help="LABEL or LABEL=TITLE of a model to show, in order (repeatable; default: every model)",
    )
    images.add_argument("--prompts", type=int, default=4, help="the set's first prompts to show")
    images.add_argument("--images", type=int, default=8, help="images per prompt and model to show")
    images.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling factor")
    images.add_argument("--out", required=True, help="PNG to write")
    curves = commands.add_parser("curves", help="reward_mean per iteration from train.py run folders")
    curves.add_argument("runs", nargs="+", help="NAME=FOLDER (or FOLDER) of a train.py run")
    curves.add_argument("--out", required=True, help="PNG to write")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.command == "images":
        with open(os.path.join(args.eval, "results.json")) as f:
            results = json.load(f)
        labels = list(results["sets"][args.set]["files"])
        specs = args.row or labels
        rows = dict(spec.split("=", 1) if "=" in spec else (spec, spec) for spec in specs)
        unknown = set(rows) - set(labels)
        if unknown:
            raise SystemExit(f"no model {sorted(unknown)} in {args.eval}; it has {labels}")
        figure, _ = image_figure(results, args.eval, args.set, rows, args.prompts, args.images, args.scale)
    else:
        runs = {}
        for spec in args.runs:
            name, folder = spec.split("=", 1) if "=" in spec else (os.path.basename(spec.rstrip("/")), spec)
            runs[name] = read_curves(folder)
        figure = curves_figure(runs)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    figure.save(args.out, optimize=True)
    print(f"wrote {args.out} ({figure.width}x{figure.height})")


if __name__ == "__main__":
    main()
