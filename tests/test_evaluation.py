"""Zero-shot group evaluation: metrics on known predictions, and a run over real shards."""
import open_clip
import pytest
import torch

from open_clip_starft.demo.data import CLASSNAMES, brace_pattern, write_shards
from open_clip_starft.eval.metrics import evaluate_zero_shot, group_metrics
from open_clip_starft.tools.tiny_model import build_tiny_model


def test_group_metrics_on_known_predictions():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    predictions = torch.tensor([0, 1, 1, 1, 0, 2])
    groups = torch.tensor([5, 5, 6, 6, 7, 7])
    m = group_metrics(predictions, labels, groups)
    assert m["top1"] == pytest.approx(4 / 6)
    assert m["groups"] == {5: 0.5, 6: 1.0, 7: 0.5}
    assert m["worst_group"] == 0.5 and m["avg_group"] == pytest.approx(2 / 3) and m["n"] == 6


def test_evaluate_zero_shot_matches_a_direct_computation(tmp_path):
    shards = brace_pattern(write_shards(str(tmp_path), 40, seed=9, biased=False, image_size=32, samples_per_shard=20))
    model, _ = build_tiny_model(seed=3)
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None, force_image_size=32)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=32)
    got = evaluate_zero_shot(model, tokenizer, preprocess, shards, CLASSNAMES, batch_size=16)
    assert got["n"] == 40 and set(got["groups"]) <= set(range(16))

    import webdataset as wds
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pilrgb").to_tuple("jpg", "cls", "group"))
    with torch.no_grad():
        text = model.encode_text(tokenizer([f"a photo of a {c}." for c in CLASSNAMES]), normalize=True)
        images = torch.stack([preprocess(img) for img, _, _ in samples])
        predictions = (model.encode_image(images, normalize=True) @ text.T).argmax(1)
    want = group_metrics(predictions, torch.tensor([int(c) for _, c, _ in samples]), torch.tensor([int(g) for _, _, g in samples]))
    assert got == want
