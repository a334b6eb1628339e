"""``open-clip-starft wise``: exact endpoints, the curve outputs, and interpolated checkpoints that
plain OpenCLIP loads."""
import json
import os

import open_clip
import pytest
import torch
from PIL import Image

from open_clip_starft.eval import cli as eval_cli, wise
from open_clip_starft.demo.data import CLASSNAMES, brace_pattern, render_sample, write_shards
from open_clip_starft.errors import StarftError
from open_clip_starft.eval.models import interpolate_state_dicts, local_dir_weights, save_openclip
from open_clip_starft.tools.tiny_model import TINY_MODEL_CFG, build_tiny_model, write_tiny_model


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("wise")
    model = write_tiny_model(str(root / "zs"), seed=0)
    fine_tuned, _ = build_tiny_model(seed=1)
    ft = root / "epoch_3.pt"  # a training checkpoint as open_clip_train writes it (DDP prefix included)
    torch.save({"epoch": 3, "name": "ft", "state_dict": {"module." + k: v for k, v in fine_tuned.state_dict().items()}}, ft)
    id_set = brace_pattern(write_shards(str(root / "id"), 24, seed=1, biased=True, image_size=32, samples_per_shard=12))
    ood = root / "ood"  # a folder of class subfolders (no groups)
    for i in range(24):
        img, cls, _ = render_sample(i, seed=2, biased=False, image_size=32)
        os.makedirs(ood / f"{cls}", exist_ok=True)  # integer folder names: the label is the number
        img.save(ood / f"{cls}" / f"{i}.jpg", quality=90)
    names = root / "names.txt"
    names.write_text("\n".join(CLASSNAMES) + "\n")
    zs_state = build_tiny_model(seed=0)[0].state_dict()
    return {"root": root, "model": model, "ft": str(ft), "id": id_set, "ood": str(ood), "names": str(names),
            "zs_state": zs_state, "ft_state": fine_tuned.state_dict()}


def test_endpoints_are_exact_and_the_middle_is_the_mean(ws):
    zs, ft = ws["zs_state"], ws["ft_state"]
    at0, at1, half = (interpolate_state_dicts(zs, ft, a) for a in (0.0, 1.0, 0.5))
    assert all(torch.equal(at0[k], zs[k]) for k in zs)
    assert all(torch.equal(at1[k], ft[k]) for k in ft)
    assert all(torch.allclose(half[k], (zs[k] + ft[k]) / 2) for k in zs if zs[k].is_floating_point())
    # the general formula is exact at the endpoints too
    for k in zs:
        if zs[k].is_floating_point():
            assert torch.equal((1 - 0.0) * zs[k] + 0.0 * ft[k], zs[k]) and torch.equal((1 - 1.0) * zs[k] + 1.0 * ft[k], ft[k])
    other = {k: v for k, v in ft.items() if k != "logit_scale"}
    with pytest.raises(StarftError, match="differ in parameter 'logit_scale'"):
        interpolate_state_dicts(zs, other, 0.5)


def test_batchnorm_step_counters_come_from_the_nearer_end_and_other_integer_buffers_must_agree():
    zs = {"bn.running_mean": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(0), "ids": torch.arange(3)}
    ft = {"bn.running_mean": torch.ones(3), "bn.num_batches_tracked": torch.tensor(70), "ids": torch.arange(3)}
    low, high = interpolate_state_dicts(zs, ft, 0.2), interpolate_state_dicts(zs, ft, 0.6)
    assert torch.allclose(low["bn.running_mean"], torch.full((3,), 0.2))  # running statistics are interpolated
    assert int(low["bn.num_batches_tracked"]) == 0 and int(high["bn.num_batches_tracked"]) == 70
    with pytest.raises(StarftError, match="non-float tensor 'ids' differs"):
        interpolate_state_dicts(zs, {**ft, "ids": torch.arange(1, 4)}, 0.5)


def test_wise_curve_outputs_and_saved_checkpoint_loads_in_openclip(ws, tmp_path):
    out = tmp_path / "wise"
    rc = wise.main(["--model", ws["model"], "--fine-tuned", ws["ft"], "--alphas", "0,0.5,1",
                    "--set", f"id={ws['id']}", "--set", f"ood={ws['ood']}", "--classnames", ws["names"], "--id", "id",
                    "--out", str(out), "--save-alpha", "0.5", "--workers", "0", "--batch-size", "12"])
    assert rc == 0
    curve = json.loads((out / "wise.json").read_text())
    assert [p["alpha"] for p in curve["points"]] == [0.0, 0.5, 1.0]
    for p in curve["points"]:
        assert p["id"] == p["sets"]["id"]["top1"] and p["ood_avg"] == p["sets"]["ood"]["top1"]
    with Image.open(out / "wise.png") as im:
        assert im.format == "PNG"
    assert (out / "results.md").read_text().splitlines()[0] == "| checkpoint | id (ID) | ood | OOD avg |"

    # α = 0 and α = 1 score exactly as the zero-shot and fine-tuned checkpoints evaluated directly
    direct = tmp_path / "direct.jsonl"
    assert eval_cli.main(["--model", ws["model"], "--pretrained", f"zs={local_dir_weights(ws['model'])}",
                          "--pretrained", f"ft={ws['ft']}", "--set", f"id={ws['id']}", "--set", f"ood={ws['ood']}",
                          "--classnames", ws["names"], "--out", str(direct), "--no-plots", "--workers", "0"]) == 0
    rows = {(r["checkpoint"], r["dataset"]): r for r in map(json.loads, direct.read_text().splitlines())}
    for alpha, label in ((0.0, "zs"), (1.0, "ft")):
        point = next(p for p in curve["points"] if p["alpha"] == alpha)
        for name in ("id", "ood"):
            assert point["sets"][name]["top1"] == rows[(label, name)]["top1"]
            assert point["sets"][name]["ece"] == pytest.approx(rows[(label, name)]["ece"], abs=1e-12)

    # the saved α = 0.5 folder is a plain OpenCLIP local-dir model with the interpolated weights
    saved = curve["saved"]["path"]
    assert saved.startswith("local-dir:")
    model, _, _ = open_clip.create_model_and_transforms(saved)
    want = interpolate_state_dicts(ws["zs_state"], ws["ft_state"], 0.5)
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def test_saved_state_dict_loads_with_a_model_name_and_pretrained_file(ws, tmp_path):
    cfg_path = tmp_path / "starft-tiny-wise.json"
    cfg_path.write_text(json.dumps(TINY_MODEL_CFG))
    open_clip.add_model_config(str(cfg_path))
    state = interpolate_state_dicts(ws["zs_state"], ws["ft_state"], 0.25)
    path = save_openclip(state, "starft-tiny-wise", str(tmp_path / "wise-0.25.pt"))
    model, _, _ = open_clip.create_model_and_transforms("starft-tiny-wise", pretrained=path)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    folder = save_openclip(state, "starft-tiny-wise", str(tmp_path / "as-dir"))
    assert os.path.isfile(os.path.join(folder.removeprefix("local-dir:"), "open_clip_config.json"))
    model, _, _ = open_clip.create_model_and_transforms(folder)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_wise_bad_alphas_and_architecture(ws, tmp_path, capsys):
    rc = wise.main(["--model", ws["model"], "--fine-tuned", ws["ft"], "--alphas", "0,1.5", "--data", ws["id"],
                    "--classnames", ws["names"], "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "every α must lie in [0, 1]" in err[0]
    small = open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
                           text_cfg={"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1})
    torch.save(small.state_dict(), tmp_path / "small.pt")
    rc = wise.main(["--model", ws["model"], "--fine-tuned", str(tmp_path / "small.pt"), "--data", ws["id"],
                    "--classnames", ws["names"], "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "small.pt" in err[0] and "is not a" in err[0]


def test_save_local_dir_checks_the_weights_and_keeps_tokenizer_settings(ws, tmp_path):
    from open_clip_starft.eval.models import save_local_dir
    state = interpolate_state_dicts(ws["zs_state"], ws["ft_state"], 0.75)
    folder = save_local_dir(state, ws["model"], str(tmp_path / "m"), tokenizer_cfg={"tokenizer_kwargs": {"clean": "whitespace"}},
                            preprocess_cfg={"interpolation": "bilinear"})
    assert sorted(os.listdir(tmp_path / "m")) == ["open_clip_config.json", "open_clip_model.safetensors"]
    config = json.loads((tmp_path / "m" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"]["tokenizer_kwargs"] == {"clean": "whitespace"}
    assert config["preprocess_cfg"]["interpolation"] == "bilinear"
    lower = open_clip.get_tokenizer(ws["model"])(["A  Photo"])
    kept = open_clip.get_tokenizer(folder)(["A  Photo"])  # "whitespace" cleaning keeps the case: other tokens
    assert not torch.equal(lower, kept)
    model, _, _ = open_clip.create_model_and_transforms(folder)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(StarftError, match="the weights are not those of .*size mismatch for text_projection"):
        save_local_dir({**state, "text_projection": state["text_projection"][:, :8]}, ws["model"], str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad" / "open_clip_config.json")


@pytest.mark.parametrize("text,fault", [
    ("0:inf:0.5", "START and STOP must lie in [0, 1]"),
    ("1:0:0.1", "STOP 0 is below START 1: write 0:1:0.1"),
    ("0:1:0.35", "the step 0.35 does not divide 0..1 (the last α would be 0.7, not 1)"),
    ("0:1:0", "STEP in (0, 1]"),
    ("0,nan", "every α must lie in [0, 1]"),
    ("a:b", "three numbers"),
])
def test_alphas_name_their_real_fault(text, fault):
    with pytest.raises(StarftError) as error:
        wise.parse_alphas(text)
    assert fault in str(error.value) and "\n" not in str(error.value)


def test_alpha_ranges_include_both_ends():
    assert wise.parse_alphas("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert wise.parse_alphas("0.2:0.8:0.2") == [0.2, 0.4, 0.6, 0.8]
    assert wise.parse_alphas("0:1:0.1")[-1] == 1.0 and len(wise.parse_alphas("0:1:0.1")) == 11


def test_weights_of_another_image_size_are_refused_not_resized(ws, tmp_path, capsys):
    def error(*argv):
        rc = wise.main([*map(str, argv), "--data", ws["id"], "--classnames", ws["names"], "--out", str(tmp_path / "w"),
                        "--workers", "0", "--no-progress", "--no-plots"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("open-clip-starft: error: "), err
        return err[0]

    big, _ = build_tiny_model(seed=1, image_size=64)  # 8x8 patches of 8 px instead of 4x4: 65 position embeddings, not 17
    torch.save({"epoch": 1, "state_dict": big.state_dict()}, tmp_path / "big.pt")
    msg = error("--model", ws["model"], "--fine-tuned", tmp_path / "big.pt")
    assert "big.pt" in msg and "64-px images" in msg and "32-px images" in msg and "resized" in msg
    msg = error("--model", ws["model"], "--zero-shot", tmp_path / "big.pt", "--fine-tuned", ws["ft"])
    assert "big.pt" in msg and "64-px" in msg and "32-px" in msg

    run = tmp_path / "run"  # a run trained with --force-image-size on a tower without size-bound weights
    os.makedirs(run / "checkpoints")
    (run / "params.txt").write_text(f"force_image_size: [48]\nmodel: {ws['model']}\n")
    import shutil
    shutil.copy(ws["ft"], run / "checkpoints" / "epoch_3.pt")
    msg = error("--model", ws["model"], "--fine-tuned", run / "checkpoints" / "epoch_3.pt")
    assert "image size 48" in msg and "takes 32" in msg
    assert not (tmp_path / "w" / "results.jsonl").exists()


def test_weights_values_that_are_not_files_are_refused(ws, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--data", ws["id"], "--classnames", ws["names"], "--out", str(tmp_path / "w")]
    assert wise.main(["--model", ws["model"], "--fine-tuned", "epoch_2.pt", *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fine-tuned 'epoch_2.pt' is not an existing file" in err[0] and str(tmp_path) in err[0]
    assert wise.main(["--model", ws["model"], "--zero-shot", "openai", "--fine-tuned", ws["ft"], *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--zero-shot: checkpoint 'openai' does not exist" in err[0] and "only from files" in err[0]
    assert wise.main(["--model", "RN50", "--zero-shot", "laion9b", "--fine-tuned", ws["ft"], *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nor a pretrained tag of RN50 (tags: openai, yfcc15m, cc12m)" in err[0]
