"""Reward functions and the prompt sources of each task (paper section 4).

A task is a prompt source plus a reward. `get_task(name)` builds one:

    task = get_task("brightness")
    prompts = task.prompts("train", seed=0)        # deterministic sequence of (prompt, metadata)
    rewards, info = task.reward(images, prompts, metadata)   # (B,) float32, dict of floats

images are float in [0, 1] with shape (B, 3, H, W); metadata is one dict per image and always
holds "group": the id of the images generated for the same prompt (minibatch rewards such as
skin-tone parity are computed per group).

Tasks (docs/rewards.md lists models, licenses and costs):
    pref         ImageReward (BLIP + MLP), the paper's, on DiffusionDB  splits train, test
    imagereward  the same task as pref, by its reward's name            splits train, test
    pickscore    PickScore (CLIP ViT-H/14) on DiffusionDB prompts       splits train, test
    skin         -SP of 4 zero-shot CLIP skin-tone buckets per group   splits train, occupations
    comp         OWLv2 detection score of the prompt's two objects     splits train, seen, unseen
    aesthetic    LAION aesthetic predictor (CLIP ViT-L/14 + MLP head)  splits train, test
    jpeg, brightness, color: weight-free rewards for CPU runs and tests

Model-backed rewards are split in two: `load_<name>(device)` downloads the real weights (one call,
needs network), `<name>_reward(model, processor, device)` scores with any model of the same
architecture, so the tests run the scoring code on tiny random models built from configs.
Models load on the first reward call, once per task. Split membership never depends on the seed
(held-out sets are drawn with the fixed SPLIT_SEED); `seed` only orders a split.
"""

import colorsys
import functools
import importlib.util
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# A reward maps (images (B, 3, H, W) in [0, 1], prompts, metadata) to (rewards (B,), info).
RewardFn = Callable[[torch.Tensor, list[str], list[dict]], tuple[torch.Tensor, dict[str, float]]]

PROMPT_DIR = Path(__file__).parent / "data" / "prompts"
SPLIT_SEED = 0  # fixed: held-out prompts and unseen objects never change with the training seed
MAX_TEST_PROMPTS = 2000  # paper: 2,000 DiffusionDB prompts held out for test

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
IMAGEREWARD_REPO = "THUDM/ImageReward"  # ImageReward.pt and med_config.json
IMAGEREWARD_TOKENIZER = "bert-base-uncased"  # BLIP's tokenizer, plus two special tokens
CLIP_MODEL = "openai/clip-vit-large-patch14"  # skin-tone classifier and aesthetic backbone
AESTHETIC_HEAD = ("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth")  # LAION MLP weights
OWL_MODEL = "google/owlv2-base-patch16-ensemble"
DIFFUSIONDB = ("poloclub/diffusiondb", "metadata.parquet")  # the 2M subset: ~1.5M unique prompts


@dataclass
class Task:
    name: str
    prompts: Callable[[str, int], Sequence[tuple[str, dict]]]  # (split, seed) -> [(prompt, metadata)]
    splits: tuple[str, ...]  # the first split is the training split
    reward: RewardFn
    minibatch: bool = False  # the reward is defined on a group of images of one prompt (skin, color)

    def load(self):
        """Build the reward model now rather than at the first reward call: train.py does it at set-up, so
        that weights that cannot be fetched stop a run in seconds, not after its first sampling pass."""
        getattr(self.reward, "load", lambda: None)()  # a weight-free reward has nothing to load


#### Minibatch reward: statistical parity (paper section 4, "skin") ####


def statistical_parity(buckets: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """SP = sum_a (mean_x 1[h(x) = a] - 1/|A|)^2 over one group's bucket ids (N,) with N >= 1."""
    p = torch.bincount(buckets, minlength=num_buckets).float() / len(buckets)  # (|A|,)
    return ((p - 1.0 / num_buckets) ** 2).sum()


def group_parity_rewards(buckets: torch.Tensor, groups: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Reward -SP of its group for every image. An image with bucket -1 (no person) counts as the bucket its
    group already has most of (the first on a tie; bucket 0 in a group with nobody in it), so leaving a
    person out never lowers SP, and a group with nobody in it gets the worst parity, 1 - 1/|A|. (Left out
    of the statistic instead, empty images let hiding over-represented faces lower SP; and when an
    all-empty group scored SP 0, RL in the toy world learned to stop drawing people: docs/toyworld.md.)"""
    rewards = torch.empty(len(buckets))
    for g in groups.unique():
        in_group = groups == g
        group = buckets[in_group]
        counts = torch.bincount(group[group >= 0], minlength=num_buckets)  # (|A|,)
        filled = torch.where(group >= 0, group, counts.argmax())
        rewards[in_group] = -statistical_parity(filled, num_buckets)
    return rewards


def parity_reward(buckets: torch.Tensor, metadata: list[dict], num_buckets: int):
    """-SP per group (paper section 4), with the mean SP over groups and the valid-image share."""
    if any("group" not in m for m in metadata):
        raise ValueError("a parity reward needs metadata[i]['group'], the id of the images of one prompt")
    groups = torch.tensor([m["group"] for m in metadata])
    rewards = group_parity_rewards(buckets, groups, num_buckets)
    sp = [-rewards[groups == g][0].item() for g in groups.unique()]
    return rewards, {"sp": float(np.mean(sp)), "valid_rate": (buckets >= 0).float().mean().item()}


#### Image helpers ####


def to_uint8_arrays(images: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) floats in [0, 1] -> B arrays (H, W, 3) uint8, the form image processors and PIL take."""
    return list((images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())


def chunks(n: int, size: int) -> list[slice]:
    """Slices of at most `size` items covering range(n): reward models run one chunk at a time."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def mlp_head(embed_dim: int = 768) -> torch.nn.Sequential:
    """The LAION improved-aesthetic-predictor MLP, which ImageReward's head copies; trained without
    activations, it is affine."""
    return torch.nn.Sequential(
        torch.nn.Linear(embed_dim, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    )


#### Weight-free rewards (CPU runs and tests) ####


def jpeg_reward(images, prompts, metadata):
    """Negative JPEG size in kB at quality 95: DDPO's compressibility reward."""
    from PIL import Image

    sizes = []
    for array in to_uint8_arrays(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    sizes = torch.tensor(sizes, dtype=torch.float32)
    return -sizes, {"jpeg_kb": sizes.mean().item()}


def brightness_reward(images, prompts, metadata):
    """Mean pixel value in [0, 1]."""
    return images.float().mean(dim=(1, 2, 3)).cpu(), {}


COLOR_BUCKETS = ("red-yellow", "yellow-cyan", "cyan-blue", "blue-red")  # quarters of the hue circle


def color_buckets(images: torch.Tensor) -> torch.Tensor:
    """Hue quarter (0..3) of each image's mean colour; a grey image has hue 0."""
    mean_rgb = images.float().mean(dim=(2, 3)).clamp(0, 1).cpu().tolist()  # (B, 3)
    hues = [colorsys.rgb_to_hsv(*rgb)[0] for rgb in mean_rgb]  # in [0, 1)
    return torch.tensor([min(int(h * len(COLOR_BUCKETS)), len(COLOR_BUCKETS) - 1) for h in hues])


def color_reward(images, prompts, metadata):
    """Colour-bucket parity: the skin reward's -SP per group, with hue quarters as the 4 buckets."""
    return parity_reward(color_buckets(images), metadata, len(COLOR_BUCKETS))


#### pref: ImageReward (the paper's) and PickScore ####


# ImageReward (Xu et al. 2023), ported onto transformers' BLIP modules: the `image-reward` package (1.5, its
# last release) imports helpers that transformers 5 removed. The port loads the official ImageReward.pt by an
# explicit key map; tests/test_rewards.py checks it against image-reward 1.5's own code on a fixture that
# tools/imagereward_fixture.py writes.
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072  # the score's normalisation
IMAGEREWARD_TOKENS = 35  # prompts padded / truncated to 35 tokens
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# BLIP's ViT-L/16 at 224 px (ImageReward's visual encoder; its LayerNorms use eps 1e-6)
VIT_LARGE = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
             "num_attention_heads": 16, "image_size": 224, "patch_size": 16}  # fmt: skip
TEXT_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "hidden_act",
                    "num_attention_heads", "max_position_embeddings", "layer_norm_eps")  # fmt: skip
UNUSED_IMAGEREWARD_KEYS = ("blip.vision_proj.", "blip.text_proj.")  # BLIP's contrastive heads, not scored


def imagereward_model(med_config: dict, vision: dict = VIT_LARGE) -> torch.nn.ModuleDict:
    """ImageReward's architecture: a BLIP ViT (`vision`), BLIP's BERT whose layers cross-attend to the image
    (med_config.json of the THUDM/ImageReward repo), and the MLP head on the text [CLS] state."""
    from transformers import BlipTextConfig, BlipVisionConfig, BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    vision_config = BlipVisionConfig(**vision, hidden_act="gelu", layer_norm_eps=1e-6)
    # BlipTextConfig's is_decoder=True gives every layer its cross-attention to the image; the forward pass
    # (is_decoder=False) keeps BERT's bidirectional self-attention mask, as ImageReward's BertModel
    text_config = BlipTextConfig(
        **{key: med_config[key] for key in TEXT_CONFIG_KEYS},
        encoder_hidden_size=vision["hidden_size"],  # the cross-attention's keys and values come from the ViT
        pad_token_id=med_config.get("pad_token_id", 0),
    )
    return torch.nn.ModuleDict(
        {
            "vision": BlipVisionModel(vision_config),
            "text": BlipTextModel(text_config, add_pooling_layer=False),
            "head": mlp_head(med_config["hidden_size"]),
        }
    )


# BLIP's ViT (timm's names) -> transformers' BlipVisionModel; the 24 blocks map by BLOCK_NAMES
VIT_NAMES = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
             "patch_embed.proj": "embeddings.patch_embedding", "norm": "post_layernorm"}  # fmt: skip
BLOCK_NAMES = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
               "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}  # fmt: skip


def imagereward_key(key: str) -> str | None:
    """The port's name of an ImageReward.pt key (unchanged for an unknown one); None for a key the score does
    not use."""
    if key.startswith(UNUSED_IMAGEREWARD_KEYS) or key == "blip.text_encoder.embeddings.position_ids":
        return None  # position_ids: the buffer 0..511, which BlipTextModel builds itself
    if key.startswith("blip.text_encoder."):  # BLIP's BERT and transformers' BlipTextModel share their names
        return "text." + key.removeprefix("blip.text_encoder.")
    if key.startswith("mlp.layers."):
        return "head." + key.removeprefix("mlp.layers.")
    if not key.startswith("blip.visual_encoder."):
        return key
    vit = key.removeprefix("blip.visual_encoder.")
    if vit in VIT_NAMES:  # the two bare parameters
        return "vision." + VIT_NAMES[vit]
    name, kind = vit.rsplit(".", 1)  # kind: weight or bias
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if block:
        name = f"encoder.layers.{block[1]}.{BLOCK_NAMES.get(block[2], block[2])}"
    return f"vision.{VIT_NAMES.get(name, name)}.{kind}"


def load_imagereward_state(model: torch.nn.ModuleDict, state: dict) -> None:
    """Load an ImageReward.pt state dict: every key must map to a parameter, and every parameter be loaded."""
    mapped = {imagereward_key(key): value for key, value in state.items()}
    mapped.pop(None, None)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        raise ValueError(f"not an ImageReward state dict: missing {missing[:5]}, unexpected {unexpected[:5]}")
    ids = state.get("blip.text_encoder.embeddings.position_ids")
    if ids is not None and not torch.equal(ids.flatten(), torch.arange(ids.numel())):
        raise ValueError("ImageReward.pt's position_ids are not 0..n-1; the port assumes plain positions")


def imagereward_tokenizer(tokenizer):
    """BLIP's tokenizer: bert-base-uncased plus [DEC] (bos) and [ENC], so that the vocabulary is 30524."""
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def imagereward_pixels(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """ImageReward's preprocessing of (B, 3, H, W) in [0, 1]: 8-bit image, PIL bicubic resize of the short
    side to 224 and centre crop (torchvision's Resize + CenterCrop on a PIL image), CLIP normalisation."""
    from PIL import Image

    pixels = []
    for array in to_uint8_arrays(images):
        h, w = array.shape[:2]
        short, long = min(h, w), max(h, w)
        long = int(size * long / short)
        image = Image.fromarray(array).resize((size, long) if w < h else (long, size), Image.BICUBIC)
        top, left = int(round((image.height - size) / 2.0)), int(round((image.width - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
        pixels.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255)
    pixels = torch.stack(pixels)  # (B, 3, 224, 224)
    return (pixels - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def imagereward_reward(model, tokenizer, device, dtype=torch.float32, batch_size: int = 16) -> RewardFn:
    """ImageReward: head(text [CLS] state attending to the ViT's image tokens), normalised by the mean and
    std of its training scores. The head runs in fp32 (as the original's `.float()` features). The model is
    moved to device and dtype in place."""
    model.to(device, dtype).eval()
    model["head"].float()

    @torch.no_grad()
    def reward(images, prompts, metadata):
        scores = []
        for part in chunks(len(images), batch_size):
            pixels = imagereward_pixels(images[part]).to(device, dtype)
            tokens = tokenizer(prompts[part], padding="max_length", truncation=True,
                               max_length=IMAGEREWARD_TOKENS, return_tensors="pt").to(device)  # fmt: skip
            image_tokens = model["vision"](pixel_values=pixels).last_hidden_state  # (b, 1 + patches, D_vit)
            text = model["text"](
                input_ids=tokens.input_ids,
                attention_mask=tokens.attention_mask,
                encoder_hidden_states=image_tokens,
                encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long, device=device),
            ).last_hidden_state  # (b, 35, D_text)
            r = model["head"](text[:, 0].float()).squeeze(1)  # the [CLS] state -> (b,)
            scores.append(((r - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).cpu())
        return torch.cat(scores), {}

    return reward


def load_imagereward(device) -> RewardFn:
    """The official weights and config (THUDM/ImageReward) and bert-base-uncased's tokenizer, from the hub."""
    from huggingface_hub import hf_hub_download
    from transformers import BertTokenizer

    med_config = json.loads(Path(hf_hub_download(IMAGEREWARD_REPO, "med_config.json")).read_text())
    weights = hf_hub_download(IMAGEREWARD_REPO, "ImageReward.pt")
    state = torch.load(weights, map_location="cpu", weights_only=True)  # tensors only, no pickled code
    model = imagereward_model(med_config, VIT_LARGE)
    load_imagereward_state(model, state)
    tokenizer = imagereward_tokenizer(BertTokenizer.from_pretrained(IMAGEREWARD_TOKENIZER))
    return imagereward_reward(model, tokenizer, device)


def pickscore_reward(model, processor, device, batch_size: int = 16) -> RewardFn:
    """PickScore: logit_scale * cos(image embedding, prompt embedding) of a CLIP model."""
    model.to(device).eval()

    @torch.no_grad()
    def reward(images, prompts, metadata):
        arrays, scores = to_uint8_arrays(images), []
        for part in chunks(len(arrays), batch_size):
            inputs = processor(
                text=prompts[part], images=arrays[part], padding=True, truncation=True, return_tensors="pt"
            ).to(device)
            scores.append(model(**inputs).logits_per_image.diagonal().float().cpu())  # image i vs prompt i
        return torch.cat(scores), {}

    return reward


def load_pickscore(device) -> RewardFn:
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(PICKSCORE_MODEL)
    return pickscore_reward(model, CLIPProcessor.from_pretrained(PICKSCORE_PROCESSOR), device)


#### skin: zero-shot CLIP skin-tone buckets ####

SKIN_TONES = ("dark", "medium-dark", "medium-light", "light")  # bucket 0..3, dark to light
SKIN_TEXTS = [f"a photo of a person with {tone} skin" for tone in SKIN_TONES]
PERSON_TEXTS = ["a photo of a person", "a photo with no people in it"]


def skin_tone_buckets(model, processor, images, device, batch_size: int = 16, person_threshold: float = 0.5):
    """Zero-shot CLIP classifier h: the skin-tone bucket (0..3) of each image, -1 when no person is seen.

    Person seen: CLIP picks PERSON_TEXTS[0] over PERSON_TEXTS[1] at probability >= person_threshold.
    """
    arrays, buckets = to_uint8_arrays(images), []
    texts = SKIN_TEXTS + PERSON_TEXTS
    with torch.no_grad():
        for part in chunks(len(arrays), batch_size):
            inputs = processor(text=texts, images=arrays[part], padding=True, return_tensors="pt").to(device)
            logits = model(**inputs).logits_per_image.float().cpu()  # (b, 6)
            tone = logits[:, : len(SKIN_TONES)].argmax(dim=1)
            p_person = logits[:, len(SKIN_TONES) :].softmax(dim=1)[:, 0]
            buckets.append(torch.where(p_person >= person_threshold, tone, -1))
    return torch.cat(buckets)


def skin_reward(model, processor, device, batch_size: int = 16) -> RewardFn:
    """-SP of the skin-tone buckets of each group (paper section 4); no person: see group_parity_rewards."""
    model.to(device).eval()

    def reward(images, prompts, metadata):
        buckets = skin_tone_buckets(model, processor, images, device, batch_size)
        return parity_reward(buckets, metadata, len(SKIN_TONES))

    return reward


def load_clip():
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(CLIP_MODEL), CLIPProcessor.from_pretrained(CLIP_MODEL)


def load_skin(device) -> RewardFn:
    return skin_reward(*load_clip(), device)


#### comp: open-vocabulary detection of the prompt's objects ####


def detection_scores(model, processor, images, objects: list[list[str]], device, batch_size: int = 4):
    """Highest OWLv2 confidence of each object in its image: list of (K_i,) tensors. Each box counts for
    the one prompt object it matches best (as a detector labels a box once), so a single box, say a
    cat-dog hybrid, cannot stand for both objects of "a cat and a dog": the objects must all be drawn."""
    arrays, scores = to_uint8_arrays(images), []
    with torch.no_grad():
        for part in chunks(len(arrays), batch_size):
            queries = [[f"a photo of {article(o)} {o}" for o in names] for names in objects[part]]
            inputs = processor(
                text=queries, images=arrays[part], padding="max_length", truncation=True, return_tensors="pt"
            ).to(device)  # OWL's text encoder takes its fixed query length (16 tokens)
            probs = model(**inputs).logits.float().cpu().sigmoid()  # (b, boxes, max queries)
            for i, names in enumerate(objects[part]):
                p = probs[i, :, : len(names)]  # (boxes, K): the padding queries left out
                own = p * torch.nn.functional.one_hot(p.argmax(1), len(names))  # a box's best object only
                scores.append(own.max(0).values)  # (K,)
    return scores


def comp_reward(model, processor, device, batch_size: int = 4, threshold: float = 0.1) -> RewardFn:
    """Mean over the prompt's objects of the best detection score, 0 for an object not found (< threshold).
    Info: found_rate, the share of objects found; all_detected, the share of images with all objects found."""
    model.to(device).eval()

    def reward(images, prompts, metadata):
        if any("objects" not in m for m in metadata):
            raise ValueError("the comp reward needs metadata[i]['objects'], the object names of prompt i")
        objects = [m["objects"] for m in metadata]
        scores = detection_scores(model, processor, images, objects, device, batch_size)
        found = [torch.where(s >= threshold, s, 0.0) for s in scores]
        rewards = torch.stack([f.mean() for f in found])
        info = {
            "found_rate": torch.cat(found).gt(0).float().mean().item(),
            "all_detected": torch.stack([f.gt(0).all() for f in found]).float().mean().item(),
        }
        return rewards, info

    return reward


def load_comp(device) -> RewardFn:
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    model = Owlv2ForObjectDetection.from_pretrained(OWL_MODEL)
    return comp_reward(model, Owlv2Processor.from_pretrained(OWL_MODEL), device)


#### aesthetic: LAION aesthetic predictor ####


def load_aesthetic_head(path, embed_dim: int = 768) -> torch.nn.Sequential:
    """Read the head's state dict (keys "layers.<i>.*") safely: tensors only, no pickled code."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    head = mlp_head(embed_dim)
    head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    return head


def aesthetic_reward(model, processor, head, device, batch_size: int = 16) -> RewardFn:
    """Aesthetic score (about 1..10) = head(L2-normalised CLIP image embedding)."""
    model.to(device).eval()
    head.to(device).eval()

    @torch.no_grad()
    def reward(images, prompts, metadata):
        arrays, scores = to_uint8_arrays(images), []
        for part in chunks(len(arrays), batch_size):
            pixels = processor(images=arrays[part], return_tensors="pt")["pixel_values"].to(device)
            embeds = model.get_image_features(pixel_values=pixels).pooler_output  # (b, D)
            embeds = embeds / embeds.norm(dim=-1, keepdim=True)
            scores.append(head(embeds.float()).squeeze(1).cpu())
        return torch.cat(scores), {}

    return reward


def load_aesthetic(device) -> RewardFn:
    from huggingface_hub import hf_hub_download

    head = load_aesthetic_head(hf_hub_download(*AESTHETIC_HEAD))
    return aesthetic_reward(*load_clip(), head, device)


def lazy(build: Callable[[], RewardFn]) -> RewardFn:
    """A reward that builds its model on the first call (or at `reward.load()`) and reuses it after."""

    @functools.cache
    def built():
        try:
            with torch.random.fork_rng(devices=[]):  # a model's random init must not move the run's RNG
                return build()
        except OSError as error:  # transformers / huggingface_hub: no network and no cached copy
            raise OSError(
                f"could not load a reward model's weights ({error}). They come from the Hugging Face hub "
                "once: give this machine network access, or point HF_HOME at a cache that holds them (set "
                "HF_HUB_OFFLINE=1 there to skip the retries). Without either, use the toy world "
                "(--model toy) or the weight-free rewards (jpeg, brightness, color)."
            ) from error

    def reward(images, prompts, metadata):
        return built()(images, prompts, metadata)

    reward.load = built
    return reward


#### Prompt sources ####


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def read_lines(path) -> list[str]:
    """Non-empty stripped lines of a text file."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line]


def read_prompt_file(path) -> list[str]:
    prompts = read_lines(path)
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts; write one prompt per line")
    return prompts


def seeded_order(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def split_prompt_list(prompts, seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """Deduplicate (whitespace- and case-insensitive) and hold out min(2000, 10%) prompts for test.

    The result depends only on the set of prompts, not on their order or repeats.
    """
    cleaned = sorted({" ".join(p.split()) for p in prompts if p and p.strip()})
    unique = {}
    for p in cleaned:
        unique.setdefault(p.lower(), p)
    unique = sorted(unique.values())
    order = seeded_order(len(unique), seed).tolist()
    num_test = min(MAX_TEST_PROMPTS, len(unique) // 10)
    return {"train": [unique[i] for i in order[num_test:]], "test": [unique[i] for i in order[:num_test]]}


def check_split(task: str, split: str, splits: Sequence[str]):
    if split not in splits:
        raise ValueError(f"unknown split {split!r} for task {task}; splits: {', '.join(splits)}")


def shuffled_prompts(prompts: list[str], seed: int) -> list[tuple[str, dict]]:
    """The prompts in a seed-fixed order, each with a fresh metadata dict."""
    return [(prompts[i], {}) for i in seeded_order(len(prompts), seed).tolist()]


def prompt_list_source(task: str, load: Callable[[], list[str]]):
    """(prompts(split, seed), splits) of a prompt list split by split_prompt_list; loaded on first use."""
    splits = ("train", "test")
    held_out = functools.cache(lambda: split_prompt_list(load()))

    def prompts(split: str, seed: int):
        check_split(task, split, splits)
        return shuffled_prompts(held_out()[split], seed)

    return prompts, splits


def load_diffusiondb_prompts() -> list[str]:
    """All prompts of the DiffusionDB 2M metadata (~1.5M unique); needs network and pyarrow once."""
    if importlib.util.find_spec("pyarrow") is None:
        raise ImportError(
            "DiffusionDB prompts need pyarrow: `pip install pyarrow`, or pass --prompt-file FILE"
        )
    import pyarrow.parquet as pq
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(DIFFUSIONDB[0], DIFFUSIONDB[1], repo_type="dataset")
    except OSError as error:  # offline with no cached copy
        raise OSError(
            f"could not fetch the DiffusionDB prompts ({error}); pass --prompt-file FILE (a prompt a line), "
            "give this machine network access once, or use the toy world (--model toy)"
        ) from error
    return pq.read_table(path, columns=["prompt"]).column("prompt").to_pylist()


# skin training prompts: people-centred captions from templates, with no ethnicity, skin or occupation word.
PEOPLE = [
    "a man",
    "a woman",
    "a person",
    "an old man",
    "an old woman",
    "a young man",
    "a young woman",
    "a boy",
    "a girl",
    "a teenager",
]
ACTIVITIES = [
    "reading a book",
    "riding a bicycle",
    "drinking coffee",
    "walking a dog",
    "playing the guitar",
    "cooking dinner",
    "talking on the phone",
    "smiling",
    "laughing",
    "sitting on a bench",
    "holding an umbrella",
    "eating a sandwich",
    "working on a laptop",
    "jogging",
    "painting a picture",
    "taking a photo",
    "waiting for a bus",
    "carrying a backpack",
    "wearing a hat",
    "looking out of a window",
]
PLACES = [
    "in a park",
    "on a city street",
    "at the beach",
    "in a kitchen",
    "in an office",
    "in a garden",
    "at a train station",
    "in a cafe",
    "in the snow",
    "in a living room",
]


def skin_prompt_lists() -> dict[str, list[str]]:
    train = [
        f"a photo of {who} {doing} {where}" for who in PEOPLE for doing in ACTIVITIES for where in PLACES
    ]
    occupations = [f"a portrait of {article(o)} {o}" for o in read_lines(PROMPT_DIR / "occupations.txt")]
    return {"train": train, "occupations": occupations}


# comp prompts: "a/an X <relation> a/an Y" (paper section 4)
RELATIONS = ("and", "next to", "near", "on side of", "beside")
UNSEEN_FRACTION = 0.15  # paper: 82 of 532 classes held out
COMP_TEST_PROMPTS = 300  # paper Table 4: 300 prompts per split


def split_objects(objects: list[str], seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """Seen / unseen object classes, each in file order; a fixed seed so the split never changes."""
    order = seeded_order(len(objects), seed).tolist()
    unseen = set(order[: round(UNSEEN_FRACTION * len(objects))])
    return {
        "seen": [o for i, o in enumerate(objects) if i not in unseen],
        "unseen": [o for i, o in enumerate(objects) if i in unseen],
    }


class PairPrompts(Sequence):
    """Lazy prompts over ordered object pairs (X != Y) and relations: item i decodes combination ids[i].

    Combination k = (x * (n - 1) + y') * |R| + r, with y' the index of Y among the objects other than X.
    """

    def __init__(self, objects: list[str], ids: torch.Tensor):
        self.objects, self.ids = objects, ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        k = int(self.ids[i])
        n, num_rel = len(self.objects), len(RELATIONS)
        x, rest = divmod(k, (n - 1) * num_rel)
        y, r = divmod(rest, num_rel)
        y += y >= x  # skip X itself
        a, b = self.objects[x], self.objects[y]
        return f"{article(a)} {a} {RELATIONS[r]} {article(b)} {b}", {"objects": [a, b]}


def num_pairs(objects: list[str]) -> int:
    return len(objects) * (len(objects) - 1) * len(RELATIONS)


def comp_prompts(objects: list[str], split: str, seed: int) -> PairPrompts:
    """train: seen-object pairs minus the held-out "seen" test pairs; seen / unseen: 300 held-out pairs."""
    classes = split_objects(objects)
    pool = classes["unseen" if split == "unseen" else "seen"]
    held_out = seeded_order(num_pairs(pool), SPLIT_SEED)[:COMP_TEST_PROMPTS]
    if split != "train":
        return PairPrompts(pool, held_out[seeded_order(len(held_out), seed)])
    ids = seeded_order(num_pairs(pool), seed)
    return PairPrompts(pool, ids[~torch.isin(ids, held_out)])


#### Prompt streams: a training run draws its prompts from a deterministic endless stream ####


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def draw_prompts(sequence, start: int, count: int, seed: int) -> tuple[list, list[int]]:
    """Prompts start .. start+count-1 of an endless stream that reshuffles `sequence` every epoch.
    Returns the (prompt, metadata) items and their indices in `sequence`."""
    n = len(sequence)
    items, indices = [], []
    for position in range(start, start + count):
        epoch, offset = divmod(position, n)
        index = int(epoch_order(n, seed, epoch)[offset])
        items.append(sequence[index])
        indices.append(index)
    return items, indices


#### The registry ####


def simple_prompts(task: str, prompt_file: str | None):
    """Prompts of prompt-independent rewards: a prompt file, else the built-in animal list (as in DDPO)."""
    path = prompt_file or PROMPT_DIR / "animals.txt"
    return prompt_list_source(task, lambda: read_prompt_file(path))


def no_prompt_file(task: str, prompt_file: str | None):
    """Refuse a prompt file for a task that builds its own prompts (with the metadata its reward needs)."""
    if prompt_file is not None:
        raise ValueError(f"task {task} builds its own prompts; --prompt-file works with {TAKES_PROMPT_FILE}")


TAKES_PROMPT_FILE = "pref, imagereward, pickscore, aesthetic, jpeg, brightness and color"


def weight_free_task(name: str, reward: RewardFn, minibatch: bool = False) -> Callable[..., Task]:
    def build(device="cpu", prompt_file=None):
        return Task(name, *simple_prompts(name, prompt_file), reward, minibatch)

    return build


def preference_task(name: str, load: Callable[[str], RewardFn]) -> Callable[..., Task]:
    def build(device="cpu", prompt_file=None):
        source = (lambda: read_prompt_file(prompt_file)) if prompt_file else load_diffusiondb_prompts
        return Task(name, *prompt_list_source(name, source), lazy(lambda: load(device)))

    return build


def aesthetic_task(device="cpu", prompt_file=None) -> Task:
    return Task("aesthetic", *simple_prompts("aesthetic", prompt_file), lazy(lambda: load_aesthetic(device)))


def skin_task(device="cpu", prompt_file=None) -> Task:
    no_prompt_file("skin", prompt_file)
    splits = ("train", "occupations")

    def prompts(split, seed):
        check_split("skin", split, splits)
        return shuffled_prompts(skin_prompt_lists()[split], seed)

    return Task("skin", prompts, splits, lazy(lambda: load_skin(device)), minibatch=True)


def comp_task(device="cpu", prompt_file=None) -> Task:
    no_prompt_file("comp", prompt_file)
    splits = ("train", "seen", "unseen")
    objects = read_lines(PROMPT_DIR / "objects.txt")

    def prompts(split, seed):
        check_split("comp", split, splits)
        return comp_prompts(objects, split, seed)

    return Task("comp", prompts, splits, lazy(lambda: load_comp(device)))


TASKS: dict[str, Callable[..., Task]] = {
    "pref": preference_task("pref", load_imagereward),  # the paper's preference reward
    "imagereward": preference_task("imagereward", load_imagereward),  # the same reward by its own name
    "pickscore": preference_task("pickscore", load_pickscore),
    "skin": skin_task,
    "comp": comp_task,
    "aesthetic": aesthetic_task,
    "jpeg": weight_free_task("jpeg", jpeg_reward),
    "brightness": weight_free_task("brightness", brightness_reward),
    "color": weight_free_task("color", color_reward, minibatch=True),
}


def get_task(name: str, device: str | torch.device = "cpu", prompt_file: str | None = None) -> Task:
    """Build the task `name` of the real world (toyworld.load_task picks the toy world's for a toy model)."""
    if name not in TASKS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(TASKS))}")
    return TASKS[name](device=device, prompt_file=prompt_file)
