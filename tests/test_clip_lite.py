"""CLIP-lite (pretrained MiniLM text tower + tiny random ViT, local-dir format): loads offline with
OpenCLIP, keeps MiniLM's weights, has a deterministic text tower, and trains through StarFT."""
import json
import os

import open_clip
import pytest
import torch
from PIL import Image

from studies.waterbirds_lite.clip_lite import (
    ClipLiteError, check_clip_lite, minilm_state_dict, write_clip_lite)
from runs import log_of, make_workspace, metric, run, train_args

TINY = dict(image_size=32, embed_dim=32, vision_width=64, vision_layers=1, patch_size=8, context_length=16)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_lite")
    ws = make_workspace(root, n=32, shards=2)
    ws["model"] = write_clip_lite(os.path.join(root, "clip_lite"), seed=0, **TINY)
    return ws


def test_loads_offline_with_pretrained_minilm_and_a_deterministic_text_tower(ws):
    model, _, preprocess = open_clip.create_model_and_transforms(ws["model"])
    tokenizer = open_clip.get_tokenizer(ws["model"])
    assert isinstance(model, open_clip.CustomTextCLIP) and isinstance(tokenizer, open_clip.tokenizer.HFTokenizer)
    assert check_clip_lite(ws["model"]) == ws["model"]

    bert = model.text.transformer
    loaded = bert.state_dict()
    for key, value in minilm_state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert bert.config.hidden_dropout_prob == bert.config.attention_probs_dropout_prob == 0

    tokens = tokenizer(["a photo of a circle.", "a photo of a square in the snow."])
    assert tokens.shape == (2, TINY["context_length"]) and tokens[0, 0] == 101  # [CLS]
    with torch.no_grad():
        model.eval()
        evaluated = model.encode_text(tokens, normalize=True)
        model.train()  # no dropout: the student in train mode sees what the eval-mode teacher sees
        trained = model.encode_text(tokens, normalize=True)
    assert evaluated.shape == (2, TINY["embed_dim"])
    assert (evaluated[0] - evaluated[1]).abs().max() > 1e-3
    assert torch.equal(evaluated, trained)
    assert preprocess(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_a_moved_folder_is_a_clear_error(ws, tmp_path):
    src = ws["model"].removeprefix("local-dir:")
    with open(os.path.join(src, "open_clip_config.json")) as f:
        cfg = json.load(f)
    cfg["model_cfg"]["text_cfg"]["hf_model_name"] = str(tmp_path / "gone")
    with open(tmp_path / "open_clip_config.json", "w") as f:
        json.dump(cfg, f)
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ClipLiteError, match="is gone.*write_clip_lite"):
        check_clip_lite(f"local-dir:{tmp_path}")


def test_starft_trains_it_with_a_locked_text_tower_and_zero_star_loss_at_step_0(ws, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run(train_args(ws, "lite", "--starft-lambda", "0.5", "--lock-text", "--lock-text-unlocked-layers", "0",
                            "--precision", "fp32", epochs=1, batch_size=16))
    assert result.returncode == 0, result.stderr[-3000:]
    log = log_of(ws, "lite")
    star, steps = metric(log, "Star_loss"), metric(log, "Step")
    assert steps[:2] == [0, 1] and len(star) >= 2
    assert abs(star[0]) < 1e-6, star  # the teacher is the student at step 0
    assert star[1] > 0

    checkpoint = torch.load(os.path.join(ws["root"], "logs", "lite", "checkpoints", "epoch_1.pt"),
                            map_location="cpu", weights_only=False)
    model, _, _ = open_clip.create_model_and_transforms(ws["model"])
    model.load_state_dict({k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()})
    # --lock-text froze MiniLM's weights (upstream leaves LayerNorms trainable unless
    # --lock-text-freeze-layer-norm); the projection trained
    bert = model.text.transformer.state_dict()
    for key, value in minilm_state_dict().items():
        if "LayerNorm" not in key:
            assert torch.equal(bert[key], value), key
    fresh, _, _ = open_clip.create_model_and_transforms(ws["model"])
    assert not torch.equal(model.text.proj.weight, fresh.text.proj.weight)


# -- v3: EfficientNet-Lite0's real ImageNet weights in OpenCLIP's timm tower -------------------------------
BIRDS = "/usr/share/tuxpaint/stamps/animals/birds"


def _stamp_on_white(name: str, size: int = 224) -> torch.Tensor:
    """Tux Paint's photographic cut-out ``name`` composited on white, centred, ``[3, size, size]``,
    normalised as the EfficientNet weights expect (mean = std = 0.5)."""
    import numpy as np
    from studies.waterbirds_lite.efficientnet import MEAN, STD
    img = Image.open(os.path.join(BIRDS, f"{name}.png")).convert("RGBA")
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    white.alpha_composite(img)
    img = white.convert("RGB")
    img.thumbnail((size, size), Image.LANCZOS)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    x = torch.tensor(np.asarray(canvas), dtype=torch.float32).permute(2, 0, 1) / 255
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


@pytest.mark.parametrize("stamp, imagenet_class", [("pink_flamingo", 130), ("duck", 97), ("penguin", 145)])
def test_efficientnet_weights_recognise_real_photographs(stamp, imagenet_class):
    """The mapped weights are ImageNet's: a flamingo photograph is class 130 (flamingo), Tux Paint's duck 97
    (drake), its penguin 145 (king penguin), each with probability > 0.5 (random weights: ~0.001)."""
    from studies.waterbirds_lite.efficientnet import imagenet_classifier
    with torch.no_grad():
        p = imagenet_classifier()(_stamp_on_white(stamp)[None]).softmax(-1)[0]
    assert int(p.argmax()) == imagenet_class and p[imagenet_class] > 0.5, (stamp, int(p.argmax()), float(p.max()))


def test_efficientnet_mapping_refuses_a_shape_mismatch_in_one_line():
    from open_clip_starft.errors import DataError
    from studies.waterbirds_lite import efficientnet
    import timm
    source = efficientnet.source_state_dict()
    target = timm.create_model(efficientnet.TIMM_NAME, pretrained=False).state_dict()  # with the ImageNet head
    assert list(efficientnet.timm_state_dict(target, source)) == list(target)
    target["bn1.num_batches_tracked"] = torch.zeros(3)  # one pair's shape differs
    with pytest.raises(DataError, match=r"^EfficientNet-Lite0 weights: _bn0.num_batches_tracked \(\) pairs with "
                                        r"timm's bn1.num_batches_tracked \(3,\): the key orders differ"):
        efficientnet.timm_state_dict(target, source)
    with pytest.raises(DataError, match="296 tensors to map onto 2"):
        efficientnet.timm_state_dict({"classifier.weight": torch.zeros(1), "x": torch.zeros(1)}, source)


def test_v3_folder_carries_the_imagenet_trunk_and_its_normalisation(tmp_path):
    """CLIP-lite v3 as OpenCLIP loads it from the folder: a CustomTextCLIP whose TimmModel trunk computes
    exactly the ImageNet classifier's pooled features, inputs normalised with mean = std = 0.5."""
    from studies.waterbirds_lite.efficientnet import imagenet_classifier
    model_name = write_clip_lite(str(tmp_path / "v3"), seed=0, image_size=64, embed_dim=32,
                                 vision_tower="efficientnet-lite0")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    assert isinstance(model, open_clip.CustomTextCLIP) and isinstance(model.visual, open_clip.timm_model.TimmModel)
    normalize = preprocess.transforms[-1]
    assert list(normalize.mean) == list(normalize.std) == [0.5, 0.5, 0.5]
    x = _stamp_on_white("pink_flamingo", 64)[None]
    classifier = imagenet_classifier()
    with torch.no_grad():
        model.eval()
        assert torch.allclose(model.visual.trunk(x), classifier.forward_head(classifier.forward_features(x),
                                                                             pre_logits=True), atol=1e-5)
        assert model.encode_image(x).shape == (1, 32)
