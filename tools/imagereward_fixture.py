"""Writes tests/data/imagereward/: a reduced ImageReward with random weights, inputs, and the scores that
image-reward 1.5's own code gives them. tests/test_rewards.py checks rewards.py's port against these scores.

image-reward 1.5 needs transformers 4.x, timm 0.6.13 and torchvision, which this project (transformers 5)
cannot import, so this script runs once in a side environment (no hub access needed):

    python3 -m venv /tmp/irenv && source /tmp/irenv/bin/activate
    pip install torch==2.14.1 torchvision==0.29.1 transformers==4.44.2 timm==0.6.13 fairscale==0.4.13
    pip install --no-deps image-reward==1.5
    python tools/imagereward_fixture.py

The model is ImageReward's own class, cut down in size only: its ViT-L/16 becomes a ViT of width 16 and depth
2 (BLIP's VisionTransformer class), its BERT gets width 16 and depth 2 through med_config.json, the MLP head
takes width 16, and the tokenizer is BertTokenizer on a small vocabulary (vocab.txt, written here) in place
of bert-base-uncased's. Weights are stored in fp16 (the scores are computed from the same fp16 values) to keep
the fixture small.
"""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "imagereward"
VISION = {"hidden_size": 16, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 224, "patch_size": 16}  # fmt: skip
WORDS = ("a an the of on in with and next to near photo painting portrait cat dog man woman red blue green "
         "old young small big house tree car bicycle sky sunset city street river beach dark light , . "
         "##s ##ing ##ed").split()  # fmt: skip
PROMPTS = [
    "a photo of a red cat",
    "an old man with a blue bicycle on the street",  # "bicycle" and "street" in the vocabulary
    "a painting of trees and houses near the river at sunset",  # "##s", "at" unknown -> [UNK]
    " ".join(["a big green tree next to a small house"] * 5),  # longer than 35 tokens: truncated
    "A Café  near the RIVER, très Old!!",  # case, accents, repeated punctuation and spaces
    "a dog 犬 and a cat 🐱 in the city",  # CJK and emoji, as DiffusionDB prompts have
]
SIZES = [(64, 64), (48, 80), (96, 64), (232, 228), (32, 32), (40, 24)]  # (H, W): square, landscape, ...


def write_vocab(folder: Path) -> None:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")


def med_config(vocab_size: int) -> dict:
    """ImageReward's med_config.json with BERT's widths and depth cut down."""
    return {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "hidden_size": 16, "initializer_range": 0.02, "intermediate_size": 32,
            "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert",
            "num_attention_heads": 2, "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2,
            "vocab_size": vocab_size, "encoder_width": VISION["hidden_size"],
            "add_cross_attention": True}  # fmt: skip


def images(generator: np.random.Generator) -> list[np.ndarray]:
    """Smooth colour ramps plus noise: images with structure, so that resizing matters."""
    arrays = []
    for h, w in SIZES:
        y, x = np.mgrid[0:h, 0:w]
        ramp = np.stack([x / w, y / h, (x + y) / (h + w)], axis=-1) * 200
        arrays.append(np.clip(ramp + generator.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8))
    return arrays


def main():
    import ImageReward.models.BLIP.blip as blip
    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
    from ImageReward.ImageReward import MLP, ImageReward
    from ImageReward.models.BLIP.vit import VisionTransformer
    from transformers import BertTokenizer

    OUT.mkdir(parents=True, exist_ok=True)
    write_vocab(OUT)
    # the only two changes to image-reward's code path: the ViT's size and where the vocabulary comes from
    blip.BertTokenizer.from_pretrained = lambda name: BertTokenizer(str(OUT / "vocab.txt"))
    blip_pretrain.create_vit = lambda *_, **__: (
        VisionTransformer(img_size=224, patch_size=16, embed_dim=VISION["hidden_size"],
                          depth=VISION["num_hidden_layers"], num_heads=VISION["num_attention_heads"]),
        VISION["hidden_size"],
    )  # fmt: skip
    config = med_config(len(WORDS) + 5 + 2)  # the vocabulary, its 5 special tokens, BLIP's [DEC] and [ENC]
    (OUT / "med_config.json").write_text(json.dumps(config, indent=1))
    torch.manual_seed(0)
    model = ImageReward(med_config=str(OUT / "med_config.json"))
    model.mlp = MLP(config["hidden_size"])
    with torch.no_grad():  # random weights of a useful scale, rounded to fp16 (the stored values)
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.randn_like(tensor) * (0.3 if name.startswith("mlp.") else 0.1)  # spread ~2
                is_norm_weight = ("norm" in name.lower()) and name.endswith("weight")
                tensor.copy_((noise + (1.0 if is_norm_weight else 0.0)).half().float())
    model.eval()
    generator = np.random.default_rng(0)
    arrays = images(generator)
    with torch.no_grad():
        scores = [model.score(p, Image.fromarray(a)) for p, a in zip(PROMPTS, arrays, strict=True)]
        tokens = model.blip.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35)
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(
        {
            "state_dict": state,
            "vision": VISION,
            "prompts": PROMPTS,
            "images": [torch.from_numpy(a) for a in arrays],  # (H, W, 3) uint8
            "input_ids": torch.tensor(tokens["input_ids"]),  # (4, 35)
            "scores": torch.tensor(scores, dtype=torch.float64),  # image-reward 1.5's model.score, one by one
        },
        OUT / "fixture.pt",
    )
    print(f"scores {scores}\nwrote {OUT} ({sum(f.stat().st_size for f in OUT.iterdir()) / 1000:.0f} kB)")


if __name__ == "__main__":
    main()
