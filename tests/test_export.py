"""``open-clip-starft export``: a real training checkpoint to a folder that plain OpenCLIP loads with
the checkpoint's logits, in the Hub upload's layout, with a model card naming every StarFT setting."""
import json
import os
import shutil

import open_clip
import pytest
import torch
import yaml
from safetensors.torch import load_file

from open_clip_starft.demo.data import CLASSNAMES, render_sample
from open_clip_starft.eval import cli as eval_cli
from open_clip_starft.eval.models import checkpoint_state, local_dir_weights
from open_clip_starft.tools import export as ex
from runs import workspace

@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory):
    """The session's finished StarFT run (conftest.tiny_run: non-default StarFT settings, TINY_RUN_FLAGS), its
    epoch_1.pt, and eval results of that checkpoint."""
    ws = workspace(tiny_run, tmp_path_factory.mktemp("export"))
    ckpt = tiny_run["checkpoints"][0]
    results = os.path.join(ws["root"], "results.jsonl")
    zero_shot = local_dir_weights(ws["model"])
    assert eval_cli.main(["--model", ws["model"], "--pretrained", f"zero-shot={zero_shot}", "--pretrained", f"starft={ckpt}",
                          "--data", ws["data"], "--classnames", ws["classes"], "--out", results, "--no-plots",
                          "--workers", "0", "--no-progress"]) == 0
    return {**ws, "ckpt": ckpt, "results": results}


def checkpoint_model(ws, ckpt):
    """The checkpoint's weights in the model its run trained, built the plain OpenCLIP way."""
    model = open_clip.create_model(ws["model"])
    open_clip.load_checkpoint(model, ckpt)  # strict, weights only; takes "state_dict", drops "module."
    return model.eval()


def logits(model, images, texts):
    with torch.no_grad():
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(texts, normalize=True)
        return model.logit_scale.exp() * image_features @ text_features.T


def test_round_trip_gives_the_checkpoints_logits_and_a_card_with_every_setting(trained, tmp_path):
    out = tmp_path / "starft-tiny"
    assert ex.main(["--checkpoint", trained["ckpt"], "--out", str(out), "--results", trained["results"]]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "open_clip_config.json", "open_clip_model.safetensors"]

    exported, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")  # plain OpenCLIP
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    original = checkpoint_model(trained, trained["ckpt"])
    _, _, original_preprocess = open_clip.create_model_and_transforms(trained["model"])
    pictures = [render_sample(i, seed=21, biased=False, image_size=32)[0] for i in range(6)]
    images = torch.stack([preprocess(p) for p in pictures])
    assert torch.equal(images, torch.stack([original_preprocess(p) for p in pictures]))
    texts = tokenizer([f"a photo of a {c}." for c in CLASSNAMES])
    assert torch.equal(texts, open_clip.get_tokenizer(trained["model"])([f"a photo of a {c}." for c in CLASSNAMES]))
    want = logits(original, images, texts)
    got = logits(exported.eval(), images, texts)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    initial = logits(checkpoint_model(trained, local_dir_weights(trained["model"])), images, texts)
    assert not torch.allclose(initial, want, atol=1e-3)  # the round trip carries the fine-tuned weights, not the initial ones

    card = (out / "README.md").read_text()
    _, meta = checkpoint_state(trained["ckpt"])  # a real training checkpoint reads weights-only
    starft = meta["starft"]
    assert len(starft) >= 12 and {"optimizer", "epoch", "name"} <= meta.keys()
    for key, value in ((k, v) for k, v in starft.items() if k != "history"):  # every StarFT setting, by its flag, with its value (a path by its name)
        shown = os.path.basename(value) if isinstance(value, str) and os.path.isabs(value) else value
        assert f"`--{key.replace('_', '-')}`: {shown}" in card, key
    assert "`--starft-lambda`: 0.7" in card and "`--starft-concepts`: texture" in card
    assert "`--starft-classnames`: classes.txt" in card
    assert "**Epochs trained:** 1 of 2" in card and "**Training data:** shards" in card
    records = {r["checkpoint"]: r for r in map(json.loads, open(trained["results"]))}
    row = next(line for line in card.splitlines() if line.startswith("| shard"))
    assert row.split(" | ")[1] == f"{100 * records['starft']['top1']:.1f}"  # this checkpoint's row, not the zero-shot's
    assert "| zero-shot |" in card and "| starft |" in card  # and the file's checkpoints side by side


def test_the_folder_is_in_the_hub_upload_layout(trained, tmp_path):
    out = tmp_path / "hub"
    ex.export(trained["ckpt"], str(out), log=lambda *_: None)
    config = json.loads((out / "open_clip_config.json").read_text())
    assert set(config) == {"model_cfg", "preprocess_cfg"}  # what open_clip.push_to_hf_hub.save_config_for_hf writes
    with open(os.path.join(trained["model"].removeprefix("local-dir:"), "open_clip_config.json")) as f:
        assert config["model_cfg"] == json.load(f)["model_cfg"]
    assert set(config["preprocess_cfg"]) >= {"mean", "std", "interpolation", "resize_mode"}
    weights = load_file(str(out / "open_clip_model.safetensors"))
    state = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    assert weights.keys() == {k.removeprefix("module.") for k in state}
    card = (out / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "library_name: open_clip" in front and "pipeline_tag: zero-shot-image-classification" in front
    assert "license: other" in front


def test_bad_input_is_one_line_and_writes_nothing(trained, tmp_path, capsys):
    def error(*argv):
        rc = ex.main([*map(str, argv)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("open-clip-starft: error: "), err
        return err[0]

    alone = tmp_path / "alone.pt"  # a checkpoint without its run folder: the model is unknown
    shutil.copy(trained["ckpt"], alone)
    assert "pass --model" in error("--checkpoint", alone, "--out", tmp_path / "a")
    other = tmp_path / "other"
    other.mkdir()
    cfg = json.loads(open(os.path.join(trained["model"].removeprefix("local-dir:"), "open_clip_config.json")).read())
    cfg["model_cfg"]["embed_dim"] = 16
    (other / "open_clip_config.json").write_text(json.dumps(cfg))
    msg = error("--checkpoint", trained["ckpt"], "--model", f"local-dir:{other}", "--out", tmp_path / "b")
    assert "size mismatch" in msg and "pass the model they were trained with" in msg
    assert not (tmp_path / "b" / "open_clip_config.json").exists()
    many = tmp_path / "many.jsonl"
    rows = [json.loads(line) for line in open(trained["results"])]
    many.write_text("".join(json.dumps({**r, "settings": {**r["settings"], "pretrained": "/elsewhere.pt"}}) + "\n" for r in rows))
    assert "none was evaluated from" in error("--checkpoint", trained["ckpt"], "--out", tmp_path / "c", "--results", many)
    assert not (tmp_path / "c").exists()
    assert "does not exist" in error("--checkpoint", tmp_path / "nowhere.pt", "--out", tmp_path / "d")


def test_the_card_names_no_path_of_this_machine_and_carries_a_model_index(trained, tmp_path):
    out = tmp_path / "card"
    ex.export(trained["ckpt"], str(out), results=trained["results"], log=lambda *_: None)
    card = (out / "README.md").read_text()
    assert trained["root"] not in card and str(tmp_path) not in card and "/tmp" not in card
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "model" and front["datasets"] == ["shards"]  # the folders' names
    assert front["library_name"] == "open_clip" and front["license"] == "other"
    (index,) = front["model-index"]
    assert index["name"] == "card"
    (result,) = index["results"]
    assert result["task"] == {"type": "zero-shot-image-classification"} and result["dataset"] == {"name": "shard", "type": "shard"}
    record = next(r for r in map(json.loads, open(trained["results"])) if r["checkpoint"] == "starft")
    metrics = {m["type"]: m["value"] for m in result["metrics"]}
    assert metrics["accuracy"] == round(100 * record["top1"], 2)
    assert metrics["worst_group_accuracy"] == round(100 * record["worst_group"], 2)
    assert metrics["average_group_accuracy"] == round(100 * record["avg_group"], 2)
    assert metrics["expected_calibration_error"] == round(record["ece"], 4)

    named = tmp_path / "named"
    assert ex.main(["--checkpoint", trained["ckpt"], "--out", str(named), "--base-model", "laion/CLIP-tiny",
                    "--card-data-name", "org/shapes"]) == 0
    front = yaml.safe_load((named / "README.md").read_text().split("---\n")[1])
    assert front["base_model"] == "laion/CLIP-tiny" and front["datasets"] == ["org/shapes"] and "model-index" not in front
    assert "Fine-tuned from `laion/CLIP-tiny` on `org/shapes`" in (named / "README.md").read_text()


def test_out_is_never_overwritten_unasked_and_never_the_source_model(trained, tmp_path, capsys):
    def error(*argv):
        rc = ex.main([*map(str, argv)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("open-clip-starft: error: "), err
        return err[0]

    out = tmp_path / "busy"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    msg = error("--checkpoint", trained["ckpt"], "--out", out)
    assert "is not empty (2 entries" in msg and "--overwrite" in msg
    assert (out / "README.md").read_text() == "my notes" and (out / "open_clip_pytorch_model.bin").read_bytes() == b"weights"

    assert ex.main(["--checkpoint", trained["ckpt"], "--out", str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "open_clip_config.json", "open_clip_model.safetensors"]
    assert "StarFT" in (out / "README.md").read_text()
    assert sorted(os.listdir(tmp_path)) == ["busy"]  # the partial folder and the old one are gone
    model = open_clip.create_model(f"local-dir:{out}")
    state = checkpoint_state(trained["ckpt"])[0]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    source = trained["model"].removeprefix("local-dir:")
    before = {n: open(os.path.join(source, n), "rb").read() for n in os.listdir(source)}
    for argv in (("--model", trained["model"], "--out", source), ("--out", source)):  # given, or from params.txt
        msg = error("--checkpoint", trained["ckpt"], *argv, "--overwrite")
        assert "is or holds the source model" in msg
    assert {n: open(os.path.join(source, n), "rb").read() for n in os.listdir(source)} == before
    run_dir = os.path.dirname(os.path.dirname(trained["ckpt"]))
    assert "is or holds the checkpoint" in error("--checkpoint", trained["ckpt"], "--out", run_dir, "--overwrite")
    assert os.path.isfile(trained["ckpt"])


def test_a_missing_or_empty_params_txt_is_named(trained, tmp_path, capsys):
    run = tmp_path / "run"
    os.makedirs(run / "checkpoints")
    shutil.copy(trained["ckpt"], run / "checkpoints" / "epoch_1.pt")
    argv = ["--checkpoint", str(run / "checkpoints" / "epoch_1.pt"), "--out", str(tmp_path / "o")]
    assert ex.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no params.txt" in err[0] and "pass --model" in err[0]
    (run / "params.txt").write_text("")
    assert ex.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{run / 'params.txt'} is empty (0 bytes" in err[0]
    assert not (tmp_path / "o").exists()
