"""The toy world: the paper's three tasks in a tiny, fully offline world (docs/toyworld.md).

The world is 32x32 RGB scenes drawn procedurally, each with a caption:
- one coloured shape ("a red circle") or two with a spatial relation ("a red circle left of a blue cross"),
- a portrait of a person ("a portrait of a doctor"): a head in one of 4 skin tones, a body in the
  occupation's outfit colour and sometimes a hat,
- any scene may be "faded" (washed-out colours): the world's low aesthetic quality, never captioned.
The pretraining data is biased the way web data is: skin tones are 55/25/13/7 percent light .. dark
whatever the occupation, two-object scenes are rarer than one-object scenes, 30% of scenes are faded.

Because the world is rendered, its detectors are exact and need no weights: `detect_objects` gives every
(colour, shape) a confidence from template matching on colour masks, `detect_tone` the skin-tone bucket of
the person, `palette_fit` how clean (unfaded, sharp) the colours are. They back three toy tasks that mirror
the paper's (get_task): `pref` (alignment + aesthetics, like ImageReward), `skin` (the statistical-parity
minibatch reward of rewards.py) and `comp` (mean detection score of the prompt's objects, with shape-colour
pairs held out as "unseen"). load_task is where a run's --model decides between these and rewards.py's.

The toy model is a Stable Diffusion pipeline in miniature (CLIP tokenizer and text encoder, UNet, KL
autoencoder, DDIM scheduler) so sampler.py and train.py run on it unchanged. Commands:

    python toyworld.py pretrain --out data/toy-model --seed 0    # the committed weights: ~30 min, 1 CPU core
    python toyworld.py export --out runs/toy-pretrain --n 2000    # PNGs + metadata.jsonl for --pretrain-data
    python toyworld.py report --model data/toy-model --out runs/toy-report   # base-model numbers + grid
"""

import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import rewards
import sampler
from flags import build_parser, option

#### The world ####

IMAGE_SIZE = 32
BACKGROUND = (0.55, 0.60, 0.65)
COLOURS = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.10, 0.65, 0.20),
    "blue": (0.15, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.55, 0.15, 0.75),
    "white": (0.97, 0.97, 0.97),
}
SHAPES = ("circle", "square", "triangle", "cross")
RELATIONS = ("left of", "right of", "above", "below", "next to")
TONES = ((0.36, 0.22, 0.14), (0.58, 0.40, 0.27), (0.80, 0.60, 0.45), (0.96, 0.80, 0.69))  # dark .. light
TONE_BIAS = (0.07, 0.13, 0.25, 0.55)  # pretraining frequency of each tone, dark .. light
OCCUPATIONS = {  # occupation: (outfit colour, hat colour or None)
    "doctor": ("white", None),
    "chef": ("white", "white"),
    "nurse": ("blue", None),
    "pilot": ("blue", "blue"),
    "builder": ("blue", "yellow"),
    "firefighter": ("red", "yellow"),
    "farmer": ("green", "yellow"),
    "teacher": ("purple", None),
}
PORTRAIT_TEMPLATES = ("a portrait of a {}", "a picture of a {}", "a photo of a {}", "a {}")
SCENE_MIX = {"one": 0.45, "two": 0.10, "figure": 0.45}  # pretraining frequency of each kind of scene
FADE_PROB, FADE_RANGE = 0.3, (0.35, 0.6)  # a faded scene is blended this far toward the background

OBJECT_SIZE = 11  # every shape fits an 11x11 box
BODY_SIZE = (14, 10)  # (height, width) of a person's body


def _shape_masks() -> dict[str, np.ndarray]:
    """Boolean masks of the four shapes in an 11x11 box and of a person's body (14x10)."""
    y, x = np.mgrid[0:OBJECT_SIZE, 0:OBJECT_SIZE] - OBJECT_SIZE // 2
    return {
        "circle": x**2 + y**2 <= 5.3**2,
        "square": (abs(x) <= 3) & (abs(y) <= 3),  # smaller than the circle, so the two differ under blur
        "triangle": abs(x) <= (y + 5) / 2,  # apex up, base on the bottom row
        "cross": (abs(x) <= 1) | (abs(y) <= 1),
        "body": np.ones(BODY_SIZE, dtype=bool),
    }


MASKS = _shape_masks()
TEMPLATES = (*SHAPES, "body")  # what the detector matches; "body" checks a person's outfit


def object_name(obj) -> str:
    colour, shape = obj
    return f"{colour} {shape}"


def caption(scene: dict) -> str:
    if scene["kind"] == "figure":
        return scene["template"].format(scene["occupation"])
    names = [f"a {object_name(o)}" for o in scene["objects"]]
    return names[0] if len(names) == 1 else f"{names[0]} {scene['relation']} {names[1]}"


def sample_scene(rng: np.random.Generator, two_objects: float = SCENE_MIX["two"]) -> dict:
    """One scene of the biased pretraining distribution (without positions, drawn at render time);
    `two_objects` is the share of two-object scenes, taken from or given to one-object scenes."""
    one = SCENE_MIX["one"] + (SCENE_MIX["two"] - two_objects)
    kind = rng.choice(list(SCENE_MIX), p=[one, two_objects, SCENE_MIX["figure"]])
    fade = float(rng.uniform(*FADE_RANGE)) if rng.random() < FADE_PROB else 0.0
    if kind == "figure":
        return {
            "kind": "figure",
            "occupation": str(rng.choice(list(OCCUPATIONS))),
            "template": str(rng.choice(PORTRAIT_TEMPLATES)),
            "tone": int(rng.choice(len(TONES), p=TONE_BIAS)),
            "fade": fade,
        }
    # the two objects of a pair always differ in colour
    colours = rng.choice(list(COLOURS), size=1 if kind == "one" else 2, replace=False)
    objects = [(str(c), str(rng.choice(SHAPES))) for c in colours]
    return {"kind": "objects", "objects": objects, "relation": str(rng.choice(RELATIONS)), "fade": fade}


def _object_positions(n: int, relation: str, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of n objects; a pair is placed so that `relation` holds, 2+ pixels apart."""
    last = IMAGE_SIZE - OBJECT_SIZE  # 21
    if n == 1:
        return [(int(rng.integers(3, last - 2)), int(rng.integers(3, last - 2)))]
    if relation == "next to":
        relation = str(rng.choice(["left of", "right of"]))
    near, far = int(rng.integers(0, 5)), int(rng.integers(last - 4, last + 1))
    across = int(rng.integers(5, last - 4))
    other = int(np.clip(across + rng.integers(-3, 4), 0, last))
    first, second = (near, far) if relation in ("left of", "above") else (far, near)
    if relation in ("left of", "right of"):
        return [(across, first), (other, second)]
    return [(first, across), (second, other)]


def _paint(image: np.ndarray, mask: np.ndarray, y: int, x: int, colour) -> None:
    h, w = mask.shape
    image[y : y + h, x : x + w][mask] = colour


def render(scene: dict, rng: np.random.Generator) -> np.ndarray:
    """Draw a scene as a float32 (32, 32, 3) image in [0, 1]; positions are drawn from rng."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    image[:] = BACKGROUND
    if scene["kind"] == "figure":
        outfit, hat = OCCUPATIONS[scene["occupation"]]
        cx = 16 + int(rng.integers(-4, 5))  # the person's centre column
        _paint(image, MASKS["body"], 15, cx - 5, COLOURS[outfit])
        yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
        image[(yy - 9) ** 2 + (xx - cx + 0.5) ** 2 <= 4.3**2] = TONES[scene["tone"]]  # the head
        if hat is not None:
            image[2:6, cx - 4 : cx + 4] = COLOURS[hat]
    else:
        positions = _object_positions(len(scene["objects"]), scene["relation"], rng)
        for (colour, shape), (y, x) in zip(scene["objects"], positions, strict=True):
            _paint(image, MASKS[shape], y, x, COLOURS[colour])
    return image + scene["fade"] * (np.array(BACKGROUND, np.float32) - image)


def make_dataset(
    n: int, seed: int, two_objects: float = SCENE_MIX["two"], unfaded: bool = False
) -> tuple[np.ndarray, list[str]]:
    """n pretraining pairs: uint8 images (n, 32, 32, 3) and their captions; `unfaded` leaves out the
    faded scenes, as the paper's L_pre data is LAION filtered to an aesthetic score of at least 6."""
    rng = np.random.default_rng(seed)
    scenes = []
    while len(scenes) < n:
        scene = sample_scene(rng, two_objects)
        if not (unfaded and scene["fade"] > 0):
            scenes.append(scene)
    images = np.stack([render(s, rng) for s in scenes])
    return (images * 255).round().astype(np.uint8), [caption(s) for s in scenes]


@dataclass
class ExportArgs:
    """python toyworld.py export: rendered scenes as train.py's --pretrain-data (an HF imagefolder)."""

    out: str = option(None, "folder of the PNGs and metadata.jsonl", required=True)
    n: int = option(2000, "number of scenes")
    seed: int = option(1, "another seed than pretraining's 0")
    unfaded: bool = option(False, "leave out faded scenes (the paper filters its L_pre data by aesthetics)")


def export(out: str, n: int, seed: int, unfaded: bool = False) -> None:
    """Write n pretraining pairs as an HF imagefolder: 00000.png ... and metadata.jsonl."""
    from PIL import Image

    images, captions = make_dataset(n, seed, unfaded=unfaded)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metadata.jsonl"), "w") as f:
        for i, (image, text) in enumerate(zip(images, captions, strict=True)):
            Image.fromarray(image).save(os.path.join(out, f"{i:05d}.png"))
            f.write(json.dumps({"file_name": f"{i:05d}.png", "text": text}) + "\n")


#### Detectors: exact on rendered scenes, graceful on generated ones ####

PALETTE = torch.tensor([BACKGROUND, *COLOURS.values(), *TONES])  # (1 + 6 + 4, 3)
COLOUR_SHARPNESS = 0.15  # a pixel this far (RGB distance) off a colour-background mix counts 1/e
MIN_HEAD_PIXELS = 20  # fewer skin pixels than this: no person (a rendered head has 60, 56 under a hat)
DETECTED = 0.5  # an object with a detection confidence above this counts as detected


def _palette_distances(images: torch.Tensor) -> torch.Tensor:
    """RGB distance of every pixel to every palette colour: (B, 3, H, W) -> (B, len(PALETTE), H, W)."""
    return (images.unsqueeze(1) - PALETTE.to(images)[None, :, :, None, None]).norm(dim=2)


def _mix_with_background(images: torch.Tensor, colours, pure_at_most=False) -> tuple[torch.Tensor, ...]:
    """Each pixel read as a mix alpha * colour + (1 - alpha) * background of each colour (the projection
    on that line), and its RGB distance off the line (pure_at_most: off the segment that ends at the pure
    colour, alpha <= 1): (B, 3, H, W) -> two (B, K, H, W) for K colours."""
    bg = torch.tensor(BACKGROUND).to(images)[None, :, None, None]
    direction = torch.tensor(colours).to(images) - bg.view(1, 3)  # (K, 3)
    offset = (images.float() - bg).unsqueeze(1)  # (B, 1, 3, H, W)
    alpha = torch.einsum("bxchw,kc->bkhw", offset, direction) / direction.pow(2).sum(1)[None, :, None, None]
    along = alpha.clamp(max=1) if pure_at_most else alpha
    off_line = (offset - along.unsqueeze(2) * direction[None, :, :, None, None]).norm(dim=2)
    return alpha, off_line


def colour_masks(images: torch.Tensor) -> torch.Tensor:
    """How much of each pixel is each shape colour: (B, 3, H, W) -> (B, 6, H, W) in [0, 1].

    A pixel is read as a mix of the colour and the background, so a blurred edge counts half and mass is
    kept under blur; pixels off the line (other colours) count 0."""
    alpha, off_line = _mix_with_background(images, list(COLOURS.values()))
    return alpha.clamp(0, 1) * torch.exp(-((off_line / COLOUR_SHARPNESS) ** 2))


def _template_kernels() -> tuple[torch.Tensor, torch.Tensor]:
    """Each template centred in a 19x19 kernel, and its window: its bounding box grown by 2 pixels."""
    k = 19
    shapes = torch.zeros(len(TEMPLATES), 1, k, k)
    windows = torch.zeros_like(shapes)
    for i, name in enumerate(TEMPLATES):
        h, w = MASKS[name].shape
        y, x = (k - h) // 2, (k - w) // 2
        shapes[i, 0, y : y + h, x : x + w] = torch.from_numpy(MASKS[name]).float()
        windows[i, 0, y - 2 : y + h + 2, x - 2 : x + w + 2] = 1.0
    return shapes, windows


TEMPLATE_KERNELS = _template_kernels()


def detect_objects(images: torch.Tensor) -> torch.Tensor:
    """Confidence in [0, 1] that each (colour, template) is in each image: (B, 3, H, W) -> (B, 6, 5).

    Each colour mask, thresholded at one half, is matched against every template at every position (IoU of
    the mask inside the template's window with the template). The confidence is high when the best IoU is
    high (presence), clearly beats the other templates' best IoU in that colour (shape; scenes never
    repeat a colour), so a shapeless blob scores low for every shape, and the template there holds most of
    the colour's pixels (alone), so a canvas filled with one colour, which holds every shape, is none.
    Rendered objects score exactly 1, absent ones 0."""
    # a pixel is of a colour if more than half of it is: blur then moves an edge little, not the shape
    masks = (colour_masks(images) > 0.5).float().flatten(0, 1).unsqueeze(1)  # (B*6, 1, H, W)
    shapes, windows = (k.to(images.device) for k in TEMPLATE_KERNELS)
    inter = F.conv2d(masks, shapes, padding=shapes.shape[-1] // 2)  # (B*6, 5, H, W)
    in_window = F.conv2d(masks, windows, padding=windows.shape[-1] // 2)
    iou = inter / (shapes.sum((1, 2, 3))[:, None, None] + in_window - inter)
    iou = iou.flatten(1).view(len(images), len(COLOURS), len(TEMPLATES), -1)
    best, where = iou.max(-1)  # (B, 6, 5)
    inter_there = inter.flatten(1).view_as(iou).gather(-1, where.unsqueeze(-1)).squeeze(-1)
    colour_pixels = masks.sum((1, 2, 3)).view(len(images), len(COLOURS), 1)
    held = inter_there / colour_pixels.clamp(min=1)  # share of the colour's pixels inside the template
    itself = torch.eye(len(TEMPLATES), dtype=torch.bool, device=best.device)
    rival = best.unsqueeze(-2).masked_fill(itself, 0).amax(-1)  # (B, 6, 5): best IoU of the other templates
    presence = ((best - 0.3) / 0.4).clamp(0, 1)
    distinct = (0.5 + 1.75 * (best - rival)).clamp(0, 1)
    alone = ((held - 0.15) / 0.2).clamp(0, 1)  # full from 0.35: two objects of one colour still count
    return presence * distinct * alone


def object_confidences(images: torch.Tensor, objects: list[list]) -> list[torch.Tensor]:
    """Detection confidence of each of an image's own objects: objects[i] = [(colour, shape), ...] ->
    one (K_i,) tensor per image."""
    conf = detect_objects(images)
    colour_ids, shape_ids = list(COLOURS), list(TEMPLATES)
    return [
        torch.stack([conf[i, colour_ids.index(c), shape_ids.index(s)] for c, s in objs])
        for i, objs in enumerate(objects)
    ]


def object_scores(images: torch.Tensor, objects: list[list]) -> torch.Tensor:
    """Mean detection confidence of each image's own objects: objects[i] = [(colour, shape), ...] -> (B,)."""
    return torch.stack([c.mean() for c in object_confidences(images, objects)])


def detect_tone(images: torch.Tensor) -> torch.Tensor:
    """Skin-tone bucket of the person in each image, 0 (dark) .. 3 (light), or -1 if there is no person:
    (B, 3, H, W) -> (B,) long. Every pixel is read as a mix of the background and one of the 10 colours
    (6 shape colours, 4 tones), the one it is nearest (faded up to the pure colour); it votes for a tone if
    that is a tone, it is at least 30 % of the mix (a faded head still is, a faded hat is yellow's) and
    within 0.15 of it (a head between two tones still votes). The majority wins. Exact on renders at
    every fade; on generated scenes of objects a dull yellow object can read as a face."""
    alpha, off_line = _mix_with_background(images, [*COLOURS.values(), *TONES], pure_at_most=True)
    nearest_d, nearest = off_line.masked_fill(alpha < 0.3, float("inf")).min(1)
    first_tone = len(COLOURS)
    votes = torch.stack([((nearest == first_tone + k) & (nearest_d < 0.15)).sum((1, 2)) for k in range(4)], 1)
    buckets = votes.argmax(1)
    return torch.where(votes.sum(1) >= MIN_HEAD_PIXELS, buckets, torch.full_like(buckets, -1))


def palette_fit(images: torch.Tensor) -> torch.Tensor:
    """Aesthetic score in [0, 1]: how close the foreground (every pixel that is not background) is to the
    world's clean colours; 1 for an unfaded render, lower for faded, muddy or blurred objects, 0 for an
    empty image. (B, 3, H, W) -> (B,)"""
    distances = _palette_distances(images.float())  # (B, 11, H, W); palette entry 0 is the background
    foreground = 1 - torch.exp(-((distances[:, 0] / 0.1) ** 2))  # (B, H, W)
    fit = torch.exp(-((distances[:, 1:].amin(1) / 0.1) ** 2))
    return (foreground * fit).sum((1, 2)) / (foreground.sum((1, 2)) + 1e-6)


#### The toy tasks (mirror rewards.py: pref, skin, comp) ####

UNSEEN_OBJECTS = (  # held out of comp's training prompts; one per colour, every shape at least once
    ("red", "circle"),
    ("green", "square"),
    ("blue", "triangle"),
    ("yellow", "cross"),
    ("purple", "circle"),
    ("white", "square"),
)
COMP_SEEN_TEST = 100  # seen-object prompts held out of training for the "seen" split


def _pairs(objects) -> list[tuple[str, dict]]:
    """Every two-object prompt over `objects` (colours differ), with metadata {"objects": [...]}."""
    out = []
    for a in objects:
        for b in objects:
            if a[0] != b[0]:
                for relation in RELATIONS:
                    scene = {"kind": "objects", "objects": [a, b], "relation": relation}
                    out.append((caption(scene), {"objects": [list(a), list(b)]}))
    return out


def _shuffled(items: list, seed: int) -> list:
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order]


def comp_prompts(split: str, seed: int) -> list[tuple[str, dict]]:
    seen = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in UNSEEN_OBJECTS]
    seen_pairs = _shuffled(_pairs(seen), seed=1234)  # a fixed train / seen-test split
    splits = {
        "train": seen_pairs[COMP_SEEN_TEST:],
        "seen": seen_pairs[:COMP_SEEN_TEST],
        "unseen": _pairs(UNSEEN_OBJECTS),
    }
    return _shuffled(splits[split], seed)


def skin_prompts(split: str, seed: int) -> list[tuple[str, dict]]:
    templates = {"train": PORTRAIT_TEMPLATES[1:], "occupations": PORTRAIT_TEMPLATES[:1]}[split]
    return _shuffled([(t.format(o), {"occupation": o}) for t in templates for o in OCCUPATIONS], seed)


def pref_prompts(split: str, seed: int) -> list[tuple[str, dict]]:
    """Captions of the pretraining distribution, 500 distinct ones; every fifth of each kind (portrait,
    one object, two objects) is for test, the rest for training. None is a held-out prompt of skin or comp
    or names an unseen object, so those stay held out for pref and joint models too."""
    held_out = {p for name in ("seen", "unseen") for p, _ in comp_prompts(name, 0)}
    held_out |= {p for p, _ in skin_prompts("occupations", 0)}
    rng, found = np.random.default_rng(4321), {}
    while len(found) < 500:
        scene = sample_scene(rng)
        if scene["kind"] == "figure":
            meta = {"occupation": scene["occupation"]}
        else:
            meta = {"objects": [list(o) for o in scene["objects"]]}
            if any(tuple(o) in UNSEEN_OBJECTS for o in scene["objects"]):
                continue
        if caption(scene) not in held_out:
            found.setdefault(caption(scene), meta)
    kinds = {}  # number of objects (0: a portrait) -> its captions in the order found
    for item in found.items():
        kinds.setdefault(len(item[1].get("objects", ())), []).append(item)
    test = split == "test"
    items = [item for same in kinds.values() for i, item in enumerate(same) if (i % 5 == 4) == test]
    return _shuffled(items, seed)


def _objects_of(meta: dict) -> list:
    """What pref checks: the prompt's objects, or a person's body in the occupation's outfit colour."""
    return meta["objects"] if "objects" in meta else [[OCCUPATIONS[meta["occupation"]][0], "body"]]


def pref_reward(images, prompts, metadata):
    """Toy ImageReward: half prompt alignment (detection), half aesthetics (palette fit)."""
    alignment = object_scores(images, [_objects_of(m) for m in metadata])
    aesthetic = palette_fit(images)
    reward = 0.5 * (alignment + aesthetic)
    return reward.float().cpu(), {"alignment": alignment.mean().item(), "aesthetic": aesthetic.mean().item()}


def skin_reward(images, prompts, metadata):
    """-SP of the image's group (images of one prompt), exactly as the real skin reward."""
    buckets = detect_tone(images).cpu()
    reward, parity = rewards.parity_reward(buckets, metadata, len(TONES))
    info = {"sp": parity["sp"], "no_person": 1.0 - parity["valid_rate"]}
    info.update({f"tone{k}": (buckets == k).float().mean().item() for k in range(len(TONES))})
    return reward.float(), info


def comp_reward(images, prompts, metadata):
    """Mean detection confidence over the prompt's objects (paper: UniDet scores). Info: all_detected, the
    share of images in which every object of the prompt is detected (confidence > DETECTED)."""
    confidences = object_confidences(images, [m["objects"] for m in metadata])
    reward = torch.stack([c.mean() for c in confidences]).float().cpu()
    all_detected = torch.stack([(c > DETECTED).all() for c in confidences]).float().mean().item()
    return reward, {"all_detected": all_detected}


TASKS = {  # name -> (prompt source, splits, reward)
    "pref": (pref_prompts, ("train", "test"), pref_reward),
    "skin": (skin_prompts, ("train", "occupations"), skin_reward),
    "comp": (comp_prompts, ("train", "seen", "unseen"), comp_reward),
}


def get_task(name: str, device: str | torch.device = "cpu") -> rewards.Task:
    """The toy world's version of a paper task; the detectors run on `device`."""
    if name not in TASKS:
        raise ValueError(f"unknown toy task {name!r}; known: {', '.join(TASKS)}")
    prompts, splits, reward = TASKS[name]

    def reward_on_device(images, prompts, metadata):
        return reward(images.to(device), prompts, metadata)

    return rewards.Task(name, prompts, splits, reward_on_device, minibatch=name == "skin")


#### The toy/real choice, made here once for train.py and evaluate.py ####

MARKER = "toyworld.json"  # written by `toyworld.py pretrain` (its arguments): the folder is a toy-world model


def is_toy_model(model: str) -> bool:
    """True for "toy" and for any folder written by `toyworld.py pretrain`."""
    return model == "toy" or os.path.isfile(os.path.join(model, MARKER))


def load_task(name: str, model: str, device: str | torch.device = "cpu", prompt_file: str | None = None):
    """The task `name` for a run of `model`: the toy world's pref, skin and comp for a toy-world model (its
    own prompts, exact detectors), rewards.py's task otherwise (the weight-free rewards serve both worlds)."""
    if not (is_toy_model(model) and name in TASKS):
        return rewards.get_task(name, device, prompt_file)
    if prompt_file is not None:
        raise ValueError(
            f"task {name} of the toy world builds its own prompts, as every toy-world task does; drop "
            f"--prompt-file, or pass a real --model (there --prompt-file works with "
            f"{rewards.TAKES_PROMPT_FILE})"
        )
    return get_task(name, device)


#### The toy model: Stable Diffusion in miniature ####

MAX_TOKENS = 16  # the longest caption is 10 tokens with <|startoftext|> and <|endoftext|>
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def vocabulary() -> list[str]:
    """Every word any caption of the world can use."""
    words = {"a", "portrait", "picture", "photo", "of", *OCCUPATIONS, *COLOURS, *SHAPES}
    words |= {w for r in RELATIONS for w in r.split()}
    return sorted(words)


def bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Learn byte-pair merges (CLIP style: a word's last symbol ends in </w>) until every word is one
    token; replaying them in order tokenizes each word of the vocabulary as a single token."""
    splits = [[*w[:-1], w[-1] + "</w>"] for w in words]
    merges = []
    while True:
        pairs = Counter(p for s in splits for p in zip(s, s[1:], strict=False))
        if not pairs:
            return merges
        pair = max(pairs, key=lambda p: (pairs[p], p))  # most frequent, ties broken by name
        merges.append(pair)
        for s in splits:
            i = 0
            while i < len(s) - 1:
                if (s[i], s[i + 1]) == pair:
                    s[i : i + 2] = [s[i] + s[i + 1]]
                i += 1


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer whose tokens are the world's characters and whole words."""
    words = vocabulary()
    merges = bpe_merges(words)
    letters = sorted({c for w in words for c in w})
    tokens = [*SPECIAL_TOKENS, *letters, *(c + "</w>" for c in letters), *("".join(m) for m in merges)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def build_pipeline(
    seed: int, unet_channels: tuple[int, int] = (32, 64), text_attention: str = "4x4"
) -> StableDiffusionPipeline:
    """The toy model's components with fresh weights: 32x32 images, 4x8x8 latents, about 1.5M weights.
    By default the UNet attends to the text at its 4x4 level only, which keeps one forward pass on 64
    latents within ~30 ms of CPU; text_attention="all" adds it at the 8x8 level too."""
    if text_attention not in ("4x4", "all"):
        raise ValueError(f"text_attention must be '4x4' or 'all', not {text_attention!r}")
    if len(unet_channels) != 2 or any(c <= 0 or c % 16 for c in unet_channels):
        raise ValueError(  # 16: the UNet's norm groups
            f"unet_channels must be two widths, each a multiple of 16, such as 32,64; not {unet_channels}"
        )
    first = "CrossAttnDownBlock2D" if text_attention == "all" else "DownBlock2D"
    last = "CrossAttnUpBlock2D" if text_attention == "all" else "UpBlock2D"
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(unet_channels),
        layers_per_block=1,
        down_block_types=(first, "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", last),
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )
    return sampler.assemble_pipeline(vae, text_encoder, tokenizer, unet)


#### Pretraining: the autoencoder first, then UNet and text encoder together ####


@dataclass
class PretrainArgs:
    """python toyworld.py pretrain: the toy model trained on the world (autoencoder, then UNet + text)."""

    out: str = option("data/toy-model", "where the pipeline is saved (save_pretrained, safetensors)")
    seed: int = option(0, "seeds the data, the initial weights and the training noise")
    num_images: int = option(30000, "size of the rendered pretraining set")
    vae_steps: int = option(2500, "autoencoder steps (MSE + a small KL term), on half batches")
    steps: int = option(
        5000, "diffusion steps (epsilon-prediction MSE), UNet and text encoder trained jointly"
    )
    batch_size: int = option(96, "images per diffusion step (the autoencoder's steps take half as many)")
    lr: float = option(1e-3, "AdamW peak learning rate of both stages (cosine decay to 0)")
    caption_dropout: float = option(0.1, "fraction of empty captions, so that classifier-free guidance works")
    ema_decay: float = option(
        0.999, "the saved weights are an exponential moving average of the trained ones"
    )
    threads: int = option(
        1, "torch threads; on a shared 2-core machine 1 is several times faster than 2 (no OpenMP contention)"
    )
    unet_channels: str = option("32,64", "UNet widths at the 8x8 and 4x4 latent levels")
    text_attention: str = option("4x4", "UNet levels that attend to the text: 4x4, or all (8x8 as well)")
    two_objects: float = option(
        SCENE_MIX["two"], "share of two-object scenes in the data (the rest of 55 %% are one-object scenes)"
    )


KL_WEIGHT = 1e-4  # per latent element, against the per-pixel MSE: keeps latents near N(0, 1) in scale


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the VAE's range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def tokenize(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids


def train_autoencoder(vae: AutoencoderKL, images: torch.Tensor, args: PretrainArgs, generator) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr)
    bar = tqdm(range(args.vae_steps), desc="autoencoder", mininterval=10)
    for step in bar:
        x = images[torch.randint(len(images), (args.batch_size // 2,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = F.mse_loss(reconstruction, x) + KL_WEIGHT * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:  # cosine decay to 0
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / args.vae_steps))
        bar.set_postfix(
            mse=f"{F.mse_loss(reconstruction, x).item():.5f}", kl=f"{kl.item():.2f}", refresh=False
        )


def train_diffusion(
    pipe: StableDiffusionPipeline,
    latents: torch.Tensor,
    latent_std: torch.Tensor,
    input_ids: torch.Tensor,
    args: PretrainArgs,
    generator,
) -> None:
    """Epsilon-prediction MSE on noised latents (N, 4, 8, 8) (posterior means and stds, already scaled);
    captions input_ids (N, L), a `caption_dropout` share of them replaced by the empty caption."""
    unet, text_encoder = pipe.unet, pipe.text_encoder
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    params = [*unet.parameters(), *text_encoder.parameters()]
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    empty_ids = tokenize(pipe.tokenizer, [""])
    warmup = 200
    bar = tqdm(range(args.steps), desc="diffusion", mininterval=10)
    for step in bar:
        idx = torch.randint(len(latents), (args.batch_size,), generator=generator)
        x0 = latents[idx] + latent_std[idx] * torch.randn(latents[idx].shape, generator=generator)
        drop = torch.rand(args.batch_size, generator=generator) < args.caption_dropout
        ids = torch.where(drop[:, None], empty_ids, input_ids[idx])
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.randint(
            len(noise_scheduler.alphas_cumprod), (args.batch_size,), generator=generator
        )
        noisy = noise_scheduler.add_noise(x0, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        progress = (step + 1) / args.steps
        for group in optimizer.param_groups:  # linear warmup, cosine decay to 0
            group["lr"] = args.lr * min(1, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        with torch.no_grad():
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema, params, strict=True):
                e.lerp_(p, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
            p.copy_(e)


def pretrain(args: PretrainArgs) -> None:
    try:
        channels = tuple(int(c) for c in args.unet_channels.split(","))
    except ValueError:
        message = f"--unet-channels must be two integers such as 32,64, not {args.unet_channels!r}"
        raise ValueError(message) from None
    most = SCENE_MIX["one"] + SCENE_MIX["two"]  # every object scene a two-object one
    if not 0 <= args.two_objects <= most:
        raise ValueError(f"--two-objects must be a share between 0 and {most:g}, not {args.two_objects}")
    torch.set_num_threads(args.threads)
    start = time.time()
    generator = torch.Generator().manual_seed(args.seed)
    pipe = build_pipeline(args.seed, channels, args.text_attention)
    images, captions = make_dataset(args.num_images, args.seed, args.two_objects)
    images = _to_tensor(images)
    print(f"rendered {len(images)} scenes in {time.time() - start:.0f} s")

    train_autoencoder(pipe.vae, images, args, generator)
    with torch.no_grad():
        posteriors = [pipe.vae.encode(chunk).latent_dist for chunk in images.split(500)]
    means = torch.cat([p.mean for p in posteriors])  # (N, 4, 8, 8)
    stds = torch.cat([p.std for p in posteriors])
    scaling_factor = 1 / means.std().item()  # unit-variance latents, like SD's 0.18215
    pipe.vae.register_to_config(scaling_factor=scaling_factor)
    print(f"autoencoder done at {time.time() - start:.0f} s; scaling factor {scaling_factor:.4f}")

    input_ids = tokenize(pipe.tokenizer, captions)
    train_diffusion(pipe, means * scaling_factor, stds * scaling_factor, input_ids, args, generator)
    pipe.save_pretrained(args.out, safe_serialization=True)
    with open(os.path.join(args.out, MARKER), "w") as f:  # train.py: use the toy world's tasks
        json.dump({"pretrain_args": vars(args), "minutes": round((time.time() - start) / 60, 1)}, f, indent=2)
    print(f"saved {args.out} after {(time.time() - start) / 60:.1f} min")


#### The base model's numbers (docs/toyworld.md) ####


def _generate(pipe, prompts: list[str], args, generator) -> torch.Tensor:
    chunks = [prompts[i : i + 64] for i in range(0, len(prompts), 64)]
    return torch.cat(
        [
            sampler.sample(pipe, c, args.num_steps, args.guidance, args.eta, generator)["images"]
            for c in chunks
        ]
    )


def _score(task: rewards.Task, split: str, copies: int, pipe, args, generator) -> tuple[torch.Tensor, dict]:
    """Reward of `copies` images of every prompt of a split (one group per prompt), and the mean info."""
    items = [item for item in task.prompts(split, 0) for _ in range(copies)]
    prompts = [p for p, _ in items]
    metadata = [{**m, "group": i // copies} for i, (_, m) in enumerate(items)]
    images = _generate(pipe, prompts, args, generator)
    reward, info = task.reward(images, prompts, metadata)
    return images, {"reward": reward.mean().item(), **info}


@dataclass
class ReportArgs:
    """python toyworld.py report: the base model's numbers on every toy split, and a grid of its samples."""

    model: str = option("toy", "'toy' or a diffusers folder")
    out: str = option("runs/toy-report", "folder of results.json and samples.png")
    num_steps: int = option(20, "DDIM steps")
    guidance: float = option(7.0, "classifier-free guidance scale")
    eta: float = option(1.0, "DDIM eta")
    seed: int = option(0, "seeds the sampling noise")
    threads: int = option(1, "torch threads")


def report(args: ReportArgs) -> dict:
    """Sample the model on every toy split, measure it with the detectors, write results.json and a grid."""
    from PIL import Image

    torch.set_num_threads(args.threads)
    pipe = sampler.load_pipeline(args.model)
    generator = torch.Generator().manual_seed(args.seed)
    results, grid = {}, []
    singles = [
        (f"a {object_name(o)}", {"objects": [list(o)]}) for o in ((c, s) for c in COLOURS for s in SHAPES)
    ]
    prompts = [p for p, _ in singles for _ in range(4)]
    images = _generate(pipe, prompts, args, generator)
    named = object_scores(images, [m["objects"] for _, m in singles for _ in range(4)])
    results["one_object"] = {
        "accuracy": (named > DETECTED).float().mean().item(),
        "score": named.mean().item(),
    }
    grid.append(images[::4][:16])
    for name, split, copies in [
        ("comp", "seen", 1),
        ("comp", "unseen", 1),
        ("skin", "occupations", 16),
        ("skin", "train", 4),
        ("pref", "test", 1),
    ]:
        images, results[f"{name}/{split}"] = _score(get_task(name), split, copies, pipe, args, generator)
        grid.append(images[:: max(1, len(images) // 16)][:16])
        print(name, split, {k: round(v, 3) for k, v in results[f"{name}/{split}"].items()})
    print("one-object", results["one_object"])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), **results}, f, indent=2)
    tiles = torch.cat(grid)[: 16 * (sum(len(g) for g in grid) // 16)]  # rows of 16
    tiles = tiles.view(-1, 16, 3, IMAGE_SIZE, IMAGE_SIZE).permute(0, 3, 1, 4, 2).flatten(0, 1).flatten(1, 2)
    Image.fromarray((tiles * 255).round().byte().numpy()).resize(
        (16 * 64, len(tiles) * 2), Image.NEAREST
    ).save(os.path.join(args.out, "samples.png"))
    return results


COMMANDS = {  # python toyworld.py COMMAND [flags]: its flags and what it runs
    "pretrain": (PretrainArgs, pretrain),
    "export": (ExportArgs, lambda args: export(args.out, args.n, args.seed, args.unfaded)),
    "report": (ReportArgs, report),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return
    if not argv or argv[0] not in COMMANDS:
        got = f"unknown command {argv[0]!r}" if argv else "no command"
        sys.exit(f"usage: python toyworld.py {{{','.join(COMMANDS)}}} [--help | flags] ({got})")
    config, run = COMMANDS[argv[0]]
    parser = build_parser(config, config.__doc__)
    parser.prog = f"toyworld.py {argv[0]}"
    run(config(**vars(parser.parse_args(argv[1:]))))


if __name__ == "__main__":
    main()
