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

import json
import math
import os
import sys
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: flags.py
from flags import option, parse  # noqa: E402

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


def read_curves(folder: str) -> dict[str, list[dict]]:
    """{task: its metrics rows, in order} from a train.py run's metrics.jsonl (L_pre rows and rows of a
    skipped update, which carry no reward_mean, left out)."""
    curves = {}
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row.get("task") != "pretrain" and "reward_mean" in row:
                curves.setdefault(row["task"], []).append(row)
    return curves


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if high <= low:
        high = low + max(abs(low), 1.0) * 1e-3
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    start = math.floor(low / step) * step
    return [start + i * step for i in range(int(math.ceil((high - start) / step)) + 1)]


def panels_of(runs: dict[str, dict[str, list[dict]]], per_step: bool) -> list[list[tuple]]:
    """Rows of panels (title, x label, {run: [(x, y, spread)]}): reward mean +- std per iteration for each
    task; with per_step, approx_kl and clipfrac by trained step (0: the on-policy first), averaged over
    iterations."""
    tasks = list(dict.fromkeys(task for curves in runs.values() for task in curves))

    def series(task, points):
        return {name: points(curves[task]) for name, curves in runs.items() if task in curves}

    rows = [[(f"{task}: training reward (mean +- std)", "iteration",
              series(task, lambda rs: [(r["iteration"], r["reward_mean"], r.get("reward_std")) for r in rs]))
             for task in tasks]]  # fmt: skip
    for key in ("approx_kl", "clipfrac") if per_step else ():

        def by_step(rs, key=key):
            lists = [r[f"{key}_per_step"] for r in rs if r.get(f"{key}_per_step")]
            return [(k, sum(values) / len(values), None) for k, values in enumerate(zip(*lists, strict=True))]

        rows.append(
            [(f"{task}: {key} by trained step", "trained step", series(task, by_step)) for task in tasks]
        )
    return rows


def draw_panel(
    figure: Image.Image, box: tuple[int, int, int, int], title: str, xlabel: str, series: dict, colors
):
    """Axes in box (left, top, right, bottom of the plot area), a line per run and a band of +- spread."""
    x0, y0, x1, y1 = box
    draw = ImageDraw.Draw(figure)
    points = [p for line in series.values() for p in line]
    if not points:
        return
    lows = [y - (s or 0) for _, y, s in points]
    highs = [y + (s or 0) for _, y, s in points]
    ticks = nice_ticks(min(lows), max(highs))
    xs = [x for x, _, _ in points]
    xmin, xmax = min(xs), max(max(xs), min(xs) + 1)

    def xy(x, y):
        return (
            x0 + (x - xmin) / (xmax - xmin) * (x1 - x0),
            y1 - (y - ticks[0]) / (ticks[-1] - ticks[0]) * (y1 - y0),
        )

    for tick in ticks:
        _, y = xy(xmin, tick)
        draw.line([(x0, y), (x1, y)], LIGHT)
        draw.text((x0 - 6, y), f"{tick:.3g}", GREY, font(11), anchor="rm")
    for x in sorted({xmin, xmax, *range(xmin, xmax + 1, max(1, (xmax - xmin) // 4 or 1))}):
        draw.text((xy(x, ticks[0])[0], y1 + 6), str(x), GREY, font(11), anchor="mt")
    draw.rectangle([x0, y0, x1, y1], outline=GREY)
    draw.text(((x0 + x1) / 2, y0 - 20), title, INK, font(13), anchor="mt")
    draw.text(((x0 + x1) / 2, y1 + 22), xlabel, GREY, font(11), anchor="mt")
    band = Image.new("RGBA", figure.size, (0, 0, 0, 0))
    for name, line in series.items():
        line = sorted(line)
        if all(s is not None for _, _, s in line) and len(line) > 1:
            outline = [xy(x, y + s) for x, y, s in line] + [xy(x, y - s) for x, y, s in reversed(line)]
            ImageDraw.Draw(band).polygon(outline, fill=(*colors[name], 40))
    figure.paste(Image.alpha_composite(figure.convert("RGBA"), band).convert("RGB"))
    draw = ImageDraw.Draw(figure)
    for name, line in series.items():
        centre = [xy(x, y) for x, y, _ in sorted(line)]
        if len(centre) > 1:
            draw.line(centre, colors[name], width=2)
        for x, y in centre:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colors[name])


def curves_figure(runs: dict[str, dict[str, list[dict]]], panel=(300, 230), per_step: bool = False):
    """One panel per task (in order of first appearance) of every run that trained it, one colour per run,
    a legend below; with per_step, rows of approx_kl and clipfrac by trained step under them."""
    rows = panels_of(runs, per_step)
    colors = {name: COLORS[i % len(COLORS)] for i, name in enumerate(runs)}
    pw, ph = panel
    left, right, top, bottom, legend = 52, 12, 28, 40, 30
    figure = Image.new("RGB", (len(rows[0]) * pw, len(rows) * ph + legend), "white")
    for r, row in enumerate(rows):
        for t, (title, xlabel, series) in enumerate(row):
            box = (t * pw + left, r * ph + top, (t + 1) * pw - right, (r + 1) * ph - bottom)
            draw_panel(figure, box, title, xlabel, series, colors)
    draw_legend(figure, colors, len(rows) * ph + 15)
    return figure


def draw_legend(figure: Image.Image, colors: dict, y: int):
    """A line of the figure at height y: each name beside a stroke of its colour."""
    draw, x = ImageDraw.Draw(figure), 10
    for name, color in colors.items():
        draw.line([(x, y), (x + 22, y)], color, width=3)
        draw.text((x + 28, y), name, INK, font(12), anchor="lm")
        x += 40 + int(draw.textlength(name, font(12)))


#### Per DDIM step (python monitor.py steps RUN) ####


def steps_figure(tables: dict[str, list[tuple[str, list[dict]]]], max_grad_norm: float, panel=(360, 250)):
    """Per task a row of two panels against the DDIM step index (0: the noisiest): mean clipfrac, and mean
    gradient norm before clipping with --max-grad-norm as a grey line; a line per stretch of iterations.
    tables: {task: [(stretch name, monitor.step_table of its rows)]}."""
    names = list(dict.fromkeys(name for stretches in tables.values() for name, _ in stretches))
    colors = {name: COLORS[i % len(COLORS)] for i, name in enumerate(names)}
    limit = f"--max-grad-norm {max_grad_norm:g}"
    colors[limit] = GREY
    pw, ph = panel
    left, right, top, bottom, legend_height = 52, 12, 28, 40, 30
    figure = Image.new("RGB", (2 * pw, len(tables) * ph + legend_height), "white")
    for r, (task, stretches) in enumerate(tables.items()):
        for c, (key, title) in enumerate([("clipfrac", "clipfrac"), ("grad_norm_mean", "gradient norm")]):
            series = {
                name: [(e["step"], e[key], None) for e in table if e["trained"]] for name, table in stretches
            }
            if key == "grad_norm_mean":  # the limit across every step of the trajectory
                steps = [e["step"] for e in stretches[0][1]]
                series[limit] = [(steps[0], max_grad_norm, None), (steps[-1], max_grad_norm, None)]
            box = (c * pw + left, r * ph + top, (c + 1) * pw - right, (r + 1) * ph - bottom)
            draw_panel(
                figure, box, f"{task}: {title} by DDIM step", "DDIM step (0: noisiest)", series, colors
            )
    draw_legend(figure, colors, len(tables) * ph + 15)
    return figure


#### Command line ####


@dataclass
class ImagesArgs:
    """python tools/figures.py images EVAL: base vs fine-tuned images from an evaluate.py output folder."""

    set: str = option("skin/occupations", "prompt set, as in results.json")
    row: list[str] = option(None, "LABEL or LABEL=TITLE of a model to show, in order (repeatable; default: "
                                  "every model)", action="append")  # fmt: skip
    prompts: int = option(4, "the set's first prompts to show", at_least=1)
    images: int = option(8, "images per prompt and model to show", at_least=1)
    scale: int = option(2, "nearest-neighbour upscaling factor", at_least=1)
    out: str = option("figure.png", "PNG to write")


@dataclass
class CurvesArgs:
    """python tools/figures.py curves [NAME=]RUN ...: reward mean +- std per iteration of train.py runs."""

    per_step: bool = option(False, "add rows of approx_kl and clipfrac by trained step (0: on-policy)")
    out: str = option("curves.png", "PNG to write")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command, folders = (argv[0], []) if argv else ("", [])
    if command in ("-h", "--help"):
        print(__doc__)
        return
    if command not in ("images", "curves"):
        raise SystemExit(
            "usage: python tools/figures.py {images EVAL | curves [NAME=]RUN ...} [flags]; see --help"
        )
    rest = argv[1:]
    while rest and not rest[0].startswith("--"):  # the positional folders come first
        folders.append(rest.pop(0))
    config = ImagesArgs if command == "images" else CurvesArgs
    args, _ = parse(config, config.__doc__, rest)
    if command == "images":
        if len(folders) != 1:
            raise SystemExit("python tools/figures.py images takes one evaluate.py --out folder")
        with open(os.path.join(folders[0], "results.json")) as f:
            results = json.load(f)
        labels = list(results["sets"][args.set]["files"])
        rows = dict(spec.split("=", 1) if "=" in spec else (spec, spec) for spec in args.row or labels)
        unknown = set(rows) - set(labels)
        if unknown:
            raise SystemExit(f"no model {sorted(unknown)} in {folders[0]}; it has {labels}")
        figure, _ = image_figure(results, folders[0], args.set, rows, args.prompts, args.images, args.scale)
    else:
        runs = {}
        for spec in folders:
            name, folder = spec.split("=", 1) if "=" in spec else (os.path.basename(spec.rstrip("/")), spec)
            runs[name] = read_curves(folder)
        figure = curves_figure(runs, per_step=args.per_step)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    figure.save(args.out, optimize=True)
    print(f"wrote {args.out} ({figure.width}x{figure.height})")


if __name__ == "__main__":
    main()
