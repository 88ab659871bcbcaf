"""Rewards and prompt sources: parity by hand-made cases, model-backed rewards on tiny random models built
from configs (the same scoring code as the real weights), and deterministic, leak-free prompt splits."""

import itertools
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import rewards
from rewards import group_parity_rewards, statistical_parity

#### Tiny models: the real architectures, random weights, built offline ####

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-"


def tiny_tokenizer(max_length):
    from transformers import CLIPTokenizer

    vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}  # OWL reads token 0 at position 0 as padding
    for c in CHARS:  # no merges: every character is a token, "</w>" marks the end of a word
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(
        vocab=vocab, merges=[], unk_token="<|endoftext|>", pad_token="!", model_max_length=max_length
    )


def tiny_text_config(vocab_size, max_length):
    layers = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    tokens = dict(vocab_size=vocab_size, max_position_embeddings=max_length, pad_token_id=0, bos_token_id=1)
    return dict(layers, **tokens, eos_token_id=2)


VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32)


@pytest.fixture(scope="module")
def tiny_clip():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(max_length=77)
    text_config = tiny_text_config(len(tokenizer), 77)
    config = CLIPConfig(text_config=text_config, vision_config=dict(VISION, patch_size=8), projection_dim=8)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPModel(config), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def tiny_owl():
    pytest.importorskip("scipy", reason="transformers' OWLv2 image processor needs scipy (or torchvision)")
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(max_length=16)
    text_config = tiny_text_config(len(tokenizer), 16)
    config = Owlv2Config(text_config=text_config, vision_config=dict(VISION, patch_size=8), projection_dim=16)
    model = Owlv2ForObjectDetection(config)
    with torch.no_grad():  # random class-head weights saturate the sigmoid at 1; shrink them so scores differ
        model.class_head.logit_scale.weight.mul_(0.01)
        model.class_head.logit_shift.weight.mul_(0.01)
    image_processor = Owlv2ImageProcessor(size={"height": 32, "width": 32})
    return model, Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer)


def random_images(n, size=40, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def groups(*ids):
    return [{"group": g} for g in ids]


#### Statistical parity and the group reward (hand-made cases) ####


def test_sp_all_in_one_bucket_and_uniform():
    assert statistical_parity(torch.tensor([2, 2, 2, 2]), 4).item() == pytest.approx(0.75**2 + 3 * 0.25**2)
    assert statistical_parity(torch.tensor([0, 1, 2, 3, 3, 2, 1, 0]), 4).item() == pytest.approx(0.0)
    assert statistical_parity(torch.tensor([0, 0, 1, 1]), 4).item() == pytest.approx(4 * 0.25**2)


def test_group_reward_unequal_groups_and_no_person():
    buckets = torch.tensor([0, 1, 2, 3, 1, 1, -1, -1, -1, 0, -1, 3, 3, 3, 0, 1, 2, -1, -1])
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4])
    r = group_parity_rewards(buckets, ids, 4)
    assert r[:4].tolist() == pytest.approx([0.0] * 4)  # uniform group of 4
    assert r[4:7].tolist() == pytest.approx([-0.75] * 3)  # both persons in bucket 1, the empty one joins them
    assert r[7:9].tolist() == pytest.approx([-0.75, -0.75])  # nobody shown: the worst parity, never a prize
    assert r[9:11].tolist() == pytest.approx([-0.75] * 2)  # one person: the empty image joins its bucket
    # group 4: tones 3,3,3,0,1,2 and two empty images, counted as the most common tone 3: shares 5,1,1,1 / 8
    expected = (5 / 8 - 1 / 4) ** 2 + 3 * (1 / 8 - 1 / 4) ** 2
    assert r[11:].tolist() == pytest.approx([-expected] * 8)
    # left out of the statistic instead, the empty images would have made it 6 people, SP 0.0833 < 0.1875
    assert statistical_parity(torch.tensor([3, 3, 3, 0, 1, 2]), 4).item() < expected


def test_leaving_a_person_out_never_lowers_sp():
    """Every group of 8 images over 4 tones and 'nobody': turning one person into an empty image never
    makes the group's parity better (as it did when empty images were left out of SP)."""

    def sp(counts, empty):
        buckets = torch.tensor([b for b, c in enumerate(counts) for _ in range(c)] + [-1] * empty)
        return -group_parity_rewards(buckets, torch.zeros(len(buckets), dtype=torch.long), 4)[0].item()

    checked = 0
    for counts in itertools.product(range(9), repeat=4):
        empty = 8 - sum(counts)
        if empty < 0:
            continue
        for tone in (t for t in range(4) if counts[t]):
            hidden = list(counts)
            hidden[tone] -= 1
            assert sp(hidden, empty + 1) >= sp(counts, empty) - 1e-7, (counts, tone)
            checked += 1
    assert checked > 500


def test_parity_reward_info_and_missing_group():
    r, info = rewards.parity_reward(torch.tensor([0, 0, 1, -1]), groups(0, 0, 1, 1), 4)
    assert r.tolist() == pytest.approx([-0.75, -0.75, -0.75, -0.75])
    assert info == pytest.approx({"sp": 0.75, "valid_rate": 0.75})
    _, info = rewards.parity_reward(torch.tensor([-1, -1]), groups(0, 0), 4)
    assert info == pytest.approx({"sp": 0.75, "valid_rate": 0.0})
    with pytest.raises(ValueError, match="group"):
        rewards.parity_reward(torch.tensor([0]), [{}], 4)


#### Weight-free rewards ####


def solid(*rgb, size=8):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, size, size)


def test_brightness_and_jpeg():
    images = torch.cat([solid(0.2, 0.2, 0.2), solid(0.8, 0.8, 0.8)])
    r, _ = rewards.brightness_reward(images, ["a", "b"], groups(0, 1))
    assert r.dtype == torch.float32 and r.tolist() == pytest.approx([0.2, 0.8])
    flat, noisy = torch.full((1, 3, 64, 64), 0.5), random_images(1, 64)
    r, info = rewards.jpeg_reward(torch.cat([flat, noisy]), ["a", "b"], groups(0, 1))
    assert r.shape == (2,) and r[0] > r[1]  # a flat image compresses better
    assert info["jpeg_kb"] == pytest.approx(-r.mean().item())


def test_color_buckets_and_parity():
    red, green, blue, magenta = solid(1, 0, 0), solid(0, 1, 0), solid(0, 0, 1), solid(1, 0, 1)
    images = torch.cat([red, green, blue, magenta, red, red])
    assert rewards.color_buckets(images).tolist() == [0, 1, 2, 3, 0, 0]
    r, _ = rewards.color_reward(images, [""] * 6, groups(0, 0, 0, 0, 1, 1))
    assert r.tolist() == pytest.approx([0.0] * 4 + [-0.75] * 2)


#### Model-backed rewards on tiny models ####


def test_pickscore_matches_clip_similarity_in_any_chunking(tiny_clip):
    model, processor = tiny_clip
    images, prompts = random_images(3), ["a red car", "two dogs", "a cat on a mat"]
    r, _ = rewards.pickscore_reward(model, processor, "cpu", batch_size=2)(images, prompts, groups(0, 1, 2))
    r_one_chunk, _ = rewards.pickscore_reward(model, processor, "cpu", batch_size=8)(
        images, prompts, groups(0, 1, 2)
    )
    assert r.shape == (3,) and r.dtype == torch.float32
    torch.testing.assert_close(r, r_one_chunk, atol=1e-5, rtol=1e-5)
    inputs = processor(
        text=prompts, images=rewards.to_uint8_arrays(images), padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        txt = txt.pooler_output
    cos = torch.nn.functional.cosine_similarity(img, txt)
    torch.testing.assert_close(r, model.logit_scale.exp().detach() * cos, atol=1e-4, rtol=1e-4)


def test_skin_reward_is_parity_of_clip_buckets(tiny_clip):
    model, processor = tiny_clip
    images, meta = random_images(6), groups(0, 0, 0, 1, 1, 1)
    buckets = rewards.skin_tone_buckets(model, processor, images, "cpu", person_threshold=0.0)
    assert set(buckets.tolist()) <= {0, 1, 2, 3}
    nobody = rewards.skin_tone_buckets(model, processor, images, "cpu", person_threshold=1.01)
    assert nobody.tolist() == [-1] * 6
    r, info = rewards.skin_reward(model, processor, "cpu", batch_size=4)(images, [""] * 6, meta)
    default = rewards.skin_tone_buckets(model, processor, images, "cpu")
    assert r.tolist() == pytest.approx(
        group_parity_rewards(default, torch.tensor([0, 0, 0, 1, 1, 1]), 4).tolist()
    )
    assert info["valid_rate"] == pytest.approx((default >= 0).float().mean().item())


def test_comp_scores_match_owlv2_post_processing(tiny_owl):
    model, processor = tiny_owl
    images = random_images(3)
    objects = [["cat", "dog"], ["red apple", "umbrella"], ["bus", "tree"]]
    scores = rewards.detection_scores(model, processor, images, objects, "cpu", batch_size=2)
    # with one query per image, OWLv2's own post-processing gives the same best score
    (cat,) = rewards.detection_scores(model, processor, images[:1], [["cat"]], "cpu")
    inputs = processor(
        text=[["a photo of a cat"]], images=rewards.to_uint8_arrays(images[:1]), return_tensors="pt"
    )
    with torch.no_grad():
        outputs = model(**inputs)
    boxes = processor.post_process_grounded_object_detection(outputs, threshold=0.0, target_sizes=[(40, 40)])[
        0
    ]
    assert cat.item() == pytest.approx(boxes["scores"].max().item(), abs=1e-5)
    assert [len(s) for s in scores] == [2, 2, 2] and all(((s >= 0) & (s <= 1)).all() for s in scores)

    meta = [{"group": i, "objects": o} for i, o in enumerate(objects)]
    r, info = rewards.comp_reward(model, processor, "cpu", threshold=0.0)(images, [""] * 3, meta)
    assert r.tolist() == pytest.approx([s.mean().item() for s in scores], abs=1e-5)
    assert info["found_rate"] == 1.0
    ordered = torch.cat(scores).sort().values
    threshold = (ordered[2] + ordered[3]).item() / 2  # between two scores, so chunking noise cannot flip one
    r, info = rewards.comp_reward(model, processor, "cpu", threshold=threshold)(images, [""] * 3, meta)
    found = [torch.where(s >= threshold, s, 0.0) for s in scores]  # an object not found scores 0
    assert r.tolist() == pytest.approx([f.mean().item() for f in found], abs=1e-5)
    assert 0 < info["found_rate"] < 1
    with pytest.raises(ValueError, match="objects"):
        rewards.comp_reward(model, processor, "cpu")(images, [""] * 3, groups(0, 1, 2))


def test_comp_one_box_counts_for_one_object_only(tiny_owl):
    """OWLv2 scores every box against every query; a box counts only for the object it matches best."""

    class Inputs(dict):
        def to(self, device):
            return self

    class OneBox:  # one box: "cat" logit 3, "dog" logit 0, and a padding query
        def __call__(self, **inputs):
            return types.SimpleNamespace(logits=torch.tensor([[[3.0, 0.0, 5.0]]]))

    def processor(**kwargs):
        return Inputs()

    (scores,) = rewards.detection_scores(OneBox(), processor, random_images(1), [["cat", "dog"]], "cpu")
    assert scores.tolist() == pytest.approx([torch.sigmoid(torch.tensor(3.0)).item(), 0.0])
    # with the tiny OWLv2: each object's score is its best over the boxes labelled with it
    model, processor = tiny_owl
    images = random_images(2)
    objects = [["cat", "dog", "bus"], ["tree", "red apple"]]
    scores = rewards.detection_scores(model, processor, images, objects, "cpu")
    for image, names, got in zip(images, objects, scores, strict=True):
        queries = [[f"a photo of {rewards.article(o)} {o}" for o in names]]
        arrays = rewards.to_uint8_arrays(image[None])
        inputs = processor(
            text=queries, images=arrays, padding="max_length", truncation=True, return_tensors="pt"
        )
        with torch.no_grad():
            probs = model(**inputs).logits[0].sigmoid()  # (boxes, K)
        label = probs.argmax(1)
        expected = [
            probs[label == k, k].max().item() if (label == k).any() else 0.0 for k in range(len(names))
        ]
        assert got.tolist() == pytest.approx(expected, abs=1e-5)


def test_comp_all_detected_is_the_share_of_images_with_every_object_found(monkeypatch):
    scores = [torch.tensor([0.9, 0.05]), torch.tensor([0.3, 0.2]), torch.tensor([0.4])]  # threshold 0.1
    monkeypatch.setattr(rewards, "detection_scores", lambda *args, **kwargs: scores)
    meta = [{"group": i, "objects": ["o"] * len(s)} for i, s in enumerate(scores)]
    r, info = rewards.comp_reward(torch.nn.Identity(), None, "cpu")(random_images(3), [""] * 3, meta)
    assert r.tolist() == pytest.approx([0.45, 0.25, 0.4])
    assert info["found_rate"] == pytest.approx(4 / 5) and info["all_detected"] == pytest.approx(2 / 3)


def test_aesthetic_head_loads_safely_and_scores(tiny_clip, tmp_path):
    model, processor = tiny_clip
    torch.manual_seed(1)
    trained = rewards.mlp_head(embed_dim=8)
    torch.save({f"layers.{k}": v for k, v in trained.state_dict().items()}, tmp_path / "head.pth")
    head = rewards.load_aesthetic_head(tmp_path / "head.pth", embed_dim=8)
    images = random_images(3)
    r, _ = rewards.aesthetic_reward(model, processor, head, "cpu", batch_size=2)(
        images, [""] * 3, groups(0, 1, 2)
    )
    pixels = processor(images=rewards.to_uint8_arrays(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embeds = model.get_image_features(pixel_values=pixels).pooler_output
        expected = trained.eval()(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(1)
    torch.testing.assert_close(r, expected, atol=1e-5, rtol=1e-5)
    torch.save({"layers.0.weight": torch.zeros(1), "code": object()}, tmp_path / "unsafe.pth")
    with pytest.raises(Exception, match="[Ww]eights only"):
        rewards.load_aesthetic_head(tmp_path / "unsafe.pth", embed_dim=8)


IMAGEREWARD_FIXTURE = Path(__file__).parent / "data" / "imagereward"  # tools/imagereward_fixture.py writes it


def fixture_imagereward():
    """(model, tokenizer, fixture): the reduced ImageReward of the fixture, loaded through the port's key map,
    and the inputs and scores that image-reward 1.5's own code gave."""
    from transformers import BertTokenizer

    fixture = torch.load(IMAGEREWARD_FIXTURE / "fixture.pt", weights_only=True)
    med_config = json.loads((IMAGEREWARD_FIXTURE / "med_config.json").read_text())
    model = rewards.imagereward_model(med_config, fixture["vision"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in fixture["state_dict"].items()}
    rewards.load_imagereward_state(model, state)
    tokenizer = rewards.imagereward_tokenizer(BertTokenizer(str(IMAGEREWARD_FIXTURE / "vocab.txt")))
    return model, tokenizer, fixture


def fixture_images(fixture) -> list[torch.Tensor]:
    return [image.permute(2, 0, 1)[None].float() / 255 for image in fixture["images"]]  # (1, 3, H, W) each


def test_imagereward_port_matches_image_reward_1_5():
    """The port on transformers' BLIP modules gives image-reward 1.5's `model.score(prompt, image)` on the
    same weights and inputs (square, portrait and landscape images, smaller and larger than 224 px; a
    truncated prompt; words outside the vocabulary)."""
    model, tokenizer, fixture = fixture_imagereward()
    tokens = tokenizer(fixture["prompts"], padding="max_length", truncation=True, max_length=35)
    assert torch.equal(torch.tensor(tokens["input_ids"]), fixture["input_ids"])  # BLIP's tokenizer
    score = rewards.imagereward_reward(model, tokenizer, "cpu")
    ours = [
        score(x, [p], groups(0))[0].item()
        for x, p in zip(fixture_images(fixture), fixture["prompts"], strict=True)
    ]
    difference = (torch.tensor(ours, dtype=torch.float64) - fixture["scores"]).abs()
    assert difference.max() <= 1e-4, difference
    assert fixture["scores"].std() > 1  # images and prompts score far apart (1e-4 is 1e-4 of the spread)


def test_imagereward_maps_every_key_of_the_original_state_dict():
    model, _, fixture = fixture_imagereward()
    ours = set(model.state_dict())
    mapped = {rewards.imagereward_key(k) for k in fixture["state_dict"]}
    unused = {k for k in fixture["state_dict"] if rewards.imagereward_key(k) is None}
    assert ours == mapped - {None}  # none missing, none unexpected
    assert unused == {
        k for k in fixture["state_dict"] if k.startswith(("blip.vision_proj.", "blip.text_proj."))
    } | {"blip.text_encoder.embeddings.position_ids"}
    broken = dict(fixture["state_dict"])
    broken["blip.visual_encoder.blocks.0.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="not an ImageReward state dict: missing \\[\\], unexpected"):
        rewards.load_imagereward_state(model, broken)
    del broken["blip.visual_encoder.blocks.0.attn.extra.weight"], broken["mlp.layers.0.weight"]
    with pytest.raises(ValueError, match="missing \\['head.0.weight'\\]"):
        rewards.load_imagereward_state(model, broken)


def test_imagereward_batches_and_chunks_give_the_same_scores_in_any_dtype():
    model, tokenizer, fixture = fixture_imagereward()
    images = torch.cat(
        [fixture_images(fixture)[0]] * 2 + [fixture_images(fixture)[0].flip(3)]
    )  # (3, 3, 64, 64)
    prompts = [fixture["prompts"][0], fixture["prompts"][3], fixture["prompts"][0]]
    score = rewards.imagereward_reward(model, tokenizer, "cpu")
    one_by_one = torch.cat([score(images[i : i + 1], prompts[i : i + 1], groups(0))[0] for i in range(3)])
    chunked, _ = rewards.imagereward_reward(model, tokenizer, "cpu", batch_size=2)(
        images, prompts, groups(0, 1, 2)
    )
    assert chunked.dtype == torch.float32 and chunked.shape == (3,)
    torch.testing.assert_close(chunked, one_by_one, atol=0, rtol=1e-5)  # batched matmuls round differently
    assert (chunked[0] - chunked[1]).abs() > 1e-3  # same image, another prompt: another score
    bf16, _ = rewards.imagereward_reward(model, tokenizer, "cpu", dtype=torch.bfloat16)(
        images, prompts, groups(0, 1, 2)
    )
    assert (
        bf16.dtype == torch.float32 and model["head"][0].weight.dtype == torch.float32
    )  # the head stays fp32
    torch.testing.assert_close(bf16, one_by_one, atol=0, rtol=0.1)  # bf16 keeps ~3 significant digits


def test_imagereward_preprocessing_resizes_the_short_side_and_crops_the_centre():
    """224 px bicubic on the short side, centre crop, CLIP normalisation: a flat image stays flat."""
    grey = torch.full((1, 3, 50, 120), 0.5)
    pixels = rewards.imagereward_pixels(grey)
    assert pixels.shape == (1, 3, 224, 224)
    expected = (round(0.5 * 255) / 255 - torch.tensor(rewards.CLIP_MEAN)) / torch.tensor(rewards.CLIP_STD)
    torch.testing.assert_close(pixels[0, :, 100, 100], expected)
    left_half = torch.cat(
        [torch.zeros(1, 3, 100, 100), torch.ones(1, 3, 100, 100)], dim=3
    )  # (1, 3, 100, 200)
    crop = rewards.imagereward_pixels(left_half)[0, 0]  # the centre 224 of 448 columns: half dark, half light
    assert crop[:, :100].max() < 0 < crop[:, 124:].min()


def test_pref_is_imagereward_and_pickscore_has_its_own_name(monkeypatch):
    """pref and imagereward fetch ImageReward (the paper's), pickscore PickScore; only at task.load()."""
    import huggingface_hub
    from transformers import CLIPModel

    fetched = []

    def offline(repo, *args, **kwargs):
        fetched.append(repo)
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(CLIPModel, "from_pretrained", offline)
    prompts = str(rewards.PROMPT_DIR / "animals.txt")
    for name, repo in [("pref", rewards.IMAGEREWARD_REPO), ("imagereward", rewards.IMAGEREWARD_REPO),
                       ("pickscore", rewards.PICKSCORE_MODEL)]:  # fmt: skip
        task = rewards.get_task(name, prompt_file=prompts)
        assert fetched == []  # building a task loads no model
        with pytest.raises(OSError, match="--model toy"):
            task.load()
        assert fetched == [repo], name
        fetched.clear()


def test_models_load_lazily_once():
    calls = []

    def build():
        calls.append(1)
        return rewards.brightness_reward

    reward = rewards.lazy(build)
    assert calls == []
    reward(torch.ones(1, 3, 2, 2), ["a"], groups(0))
    reward(torch.ones(1, 3, 2, 2), ["a"], groups(0))
    assert calls == [1]


def test_a_reward_model_that_cannot_be_downloaded_says_what_to_do(monkeypatch):
    """Offline with no cached copy from_pretrained raises OSError; the reward says where weights come from."""
    from transformers import Owlv2ForObjectDetection

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(Owlv2ForObjectDetection, "from_pretrained", offline)
    task = rewards.get_task("comp")
    with pytest.raises(OSError, match="HF_HOME.*--model toy") as raised:
        task.reward(torch.ones(1, 3, 8, 8), ["a cat"], [{"objects": ["cat"]}])
    assert "couldn't connect" in str(raised.value)


def test_import_is_light():
    code = "import rewards, sys; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=rewards.PROMPT_DIR.parent.parent)


#### Prompt sources ####


def test_split_prompt_list_dedups_and_holds_out():
    prompts = [f"prompt {i}" for i in range(50)] + ["Prompt  3", " prompt 7 ", "", None]
    split = rewards.split_prompt_list(prompts)
    assert len(split["test"]) == 5 and len(split["train"]) == 45
    assert not set(split["test"]) & set(split["train"])
    assert sorted(p.lower() for p in split["train"] + split["test"]) == sorted(
        {f"prompt {i}" for i in range(50)}
    )
    assert (
        rewards.split_prompt_list(list(reversed(prompts)) + prompts) == split
    )  # order and repeats do not matter


def test_prompt_file_source(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(f"a photo of thing {i}" for i in range(30)) + "\n\n")
    task = rewards.get_task("brightness", prompt_file=str(path))
    assert task.splits == ("train", "test")
    train = task.prompts("train", 0)
    assert len(train) == 27 and len(task.prompts("test", 0)) == 3
    assert train == task.prompts("train", 0) and train != task.prompts("train", 1)
    assert sorted(train) == sorted(task.prompts("train", 1))  # the seed orders a split, never changes it
    assert all(meta == {} for _, meta in train)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts"):
        rewards.get_task("pref", prompt_file=str(tmp_path / "empty.txt")).prompts("train", 0)


def test_weight_free_tasks_run_offline_on_builtin_prompts():
    for name in ("jpeg", "brightness", "color"):
        task = rewards.get_task(name)
        prompts = task.prompts(task.splits[0], seed=0)
        assert len(prompts) >= 30 and isinstance(prompts[0][0], str)
        r, info = task.reward(random_images(4), [p for p, _ in prompts[:4]], groups(0, 0, 1, 1))
        assert (
            r.shape == (4,) and r.dtype == torch.float32 and all(isinstance(v, float) for v in info.values())
        )


def test_skin_prompts_have_no_ethnicity_words_and_occupations_are_held_out():
    task = rewards.get_task("skin")
    train, occupations = task.prompts("train", 0), task.prompts("occupations", 0)
    banned = {"skin", "black", "white", "brown", "dark", "light", "pale", "asian", "african", "european"}
    banned |= {"indian", "latino", "latina", "hispanic", "caucasian", "arab"}
    assert not any(banned & set(p.split()) for p, _ in train)
    assert len(occupations) == 100 and ("a portrait of an accountant", {}) in occupations
    assert not {p for p, _ in train} & {p for p, _ in occupations}
    with pytest.raises(ValueError, match="splits: train, occupations"):
        task.prompts("test", 0)
    with pytest.raises(ValueError, match="builds its own prompts"):
        rewards.get_task("skin", prompt_file="x.txt")


def test_comp_objects_split_into_seen_and_unseen():
    objects = rewards.read_lines(rewards.PROMPT_DIR / "objects.txt")
    assert len(objects) >= 300 and len(set(objects)) == len(objects)
    classes = rewards.split_objects(objects)
    assert not set(classes["seen"]) & set(classes["unseen"])
    assert len(classes["unseen"]) == round(0.15 * len(objects))
    assert classes == rewards.split_objects(list(objects))


def test_comp_prompts_are_lazy_deterministic_and_never_leak():
    task = rewards.get_task("comp")
    classes = rewards.split_objects(rewards.read_lines(rewards.PROMPT_DIR / "objects.txt"))
    train, seen, unseen = (task.prompts(s, seed=0) for s in task.splits)
    n = len(classes["seen"])
    assert len(train) == n * (n - 1) * 5 - 300 and len(seen) == 300 and len(unseen) == 300
    assert train[:5] == task.prompts("train", seed=0)[:5] and train[0] != task.prompts("train", seed=1)[0]
    assert set(train.ids.tolist()).isdisjoint(seen.ids.tolist())  # held-out seen prompts are never trained on
    for _, meta in unseen:
        assert set(meta["objects"]) <= set(classes["unseen"])
    for prompt, meta in [train[i] for i in range(0, len(train), 9973)] + list(seen):
        x, y = meta["objects"]
        assert x != y and set(meta["objects"]) <= set(classes["seen"])
        assert prompt.startswith(f"{rewards.article(x)} {x} ") and prompt.endswith(
            f" {rewards.article(y)} {y}"
        )
    assert any(p.startswith("an ") for p, _ in seen)
    assert rewards.PairPrompts(["apple", "cat"], torch.arange(10))[:2] == [
        ("an apple and a cat", {"objects": ["apple", "cat"]}),
        ("an apple next to a cat", {"objects": ["apple", "cat"]}),
    ]


def test_registry_names_and_unknown_name():
    expected = {
        "pref",
        "imagereward",
        "pickscore",
        "skin",
        "comp",
        "aesthetic",
        "jpeg",
        "brightness",
        "color",
    }
    assert set(rewards.TASKS) == expected
    with pytest.raises(ValueError, match="known rewards: aesthetic, brightness, color, comp"):
        rewards.get_task("nope")
    assert [name for name in sorted(expected) if rewards.get_task(name).minibatch] == [
        "color",
        "skin",
    ]
    assert rewards.get_task("pref").splits == ("train", "test")
    assert rewards.get_task("comp").splits == ("train", "seen", "unseen")
