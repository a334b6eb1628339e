"""CLIP-lite (pretrained MiniLM text tower + tiny random ViT, local-dir format): loads offline with
OpenCLIP, keeps MiniLM's weights, has a deterministic text tower, and trains through StarFT."""
import json
import os

import open_clip
import pytest
import torch
from PIL import Image

from open_clip_starft.studies.waterbirds_lite.clip_lite import (
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
