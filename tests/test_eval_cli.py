"""``open-clip-starft eval``: agreement with open_clip_train's zero-shot eval and with CLIP_benchmark,
the set layouts, suites, outputs, run folders and one-line errors for bad input."""
import json
import os
import pickle
import shutil

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from open_clip_starft.eval import cli as eval_cli
from open_clip_starft.demo.data import CLASSNAMES, brace_pattern, render_sample, write_shards
from open_clip_starft.eval.sets import EvalSetSpec, batches, load_suite, prepare_set
from open_clip_starft.host.hooks import zero_shot_accuracy
from open_clip_starft.tools.tiny_model import build_tiny_model, write_tiny_model

NAMES6 = CLASSNAMES + ["star", "hexagon"]  # two distractor names, so that top-5 is defined


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    shards = brace_pattern(write_shards(str(root / "shards"), 40, seed=9, biased=False, image_size=32, samples_per_shard=20))
    names = root / "names6.txt"
    names.write_text("\n".join(NAMES6) + "\n")
    model = write_tiny_model(str(root / "model"), seed=3)
    return {"root": root, "shards": shards, "names": str(names), "model": model}


def run_eval(*argv):
    return eval_cli.main([*map(str, argv), "--workers", "0", "--batch-size", "16"])


def records_of(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("open-clip-starft: error: "), err
    assert "Traceback" not in err[0]
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def test_agrees_with_open_clip_train_zero_shot(ws, tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    assert run_eval("--model", ws["model"], "--data", ws["shards"], "--classnames", ws["names"],
                    "--templates", "openai", "--out", out, "--no-plots") == 0
    (ours,) = records_of(out)

    import open_clip_train.zero_shot as zs
    import webdataset as wds
    from open_clip_train.data import DataInfo
    from types import SimpleNamespace
    model, _, preprocess = open_clip.create_model_and_transforms(ws["model"])
    tokenizer = open_clip.get_tokenizer(ws["model"])
    loader = (wds.WebDataset(ws["shards"], shardshuffle=False).decode("pilrgb").to_tuple("jpg", "cls")
              .map_tuple(preprocess, int).batched(16, partial=True))
    args = SimpleNamespace(zeroshot_frequency=1, epochs=1, distributed=False, horovod=False, model=ws["model"],
                           device="cpu", precision="fp32", batch_size=16)
    monkeypatch.setattr(zs, "IMAGENET_CLASSNAMES", NAMES6)     # upstream's eval, on our class names
    monkeypatch.setattr(zs, "accuracy", zero_shot_accuracy)    # upstream's numpy ≥ 2.4 fix
    upstream = zs.zero_shot_eval(model.eval(), {"imagenet-val": DataInfo(torch.utils.data.DataLoader(loader, batch_size=None))},
                                 1, args, tokenizer)
    assert ours["n"] == 40 and ours["settings"]["num_templates"] == 80
    assert ours["top1"] == pytest.approx(upstream["imagenet-zeroshot-val-top1"], abs=1e-12)
    assert ours["top5"] == pytest.approx(upstream["imagenet-zeroshot-val-top5"], abs=1e-12)


def _clip_benchmark_layout(root, seed=11):
    paths = write_shards(str(root / "test"), 30, seed=seed, biased=False, image_size=32, samples_per_shard=15)
    for i, p in enumerate(paths):
        os.rename(p, str(root / "test" / f"{i}.tar"))
    (root / "test" / "nshards.txt").write_text(f"{len(paths)}\n")
    (root / "classnames.txt").write_text("\n".join(NAMES6) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na drawing of the {c}.\n")
    return str(root)


def test_agrees_with_clip_benchmark(ws, tmp_path, monkeypatch):
    zsc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    from clip_benchmark.datasets.builder import build_dataset
    root = _clip_benchmark_layout(tmp_path / "wds_shapes")
    out = tmp_path / "r.jsonl"
    assert run_eval("--model", ws["model"], "--data", root, "--out", out, "--no-plots") == 0
    (ours,) = records_of(out)
    assert ours["settings"]["format"] == "clip_benchmark" and ours["settings"]["num_templates"] == 2

    def accuracy(output, target, topk=(1,)):  # CLIP_benchmark 1.6.2's accuracy with only the numpy ≥ 2.4 fix
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [float(correct[:k].reshape(-1).float().sum().item()) / len(target) for k in topk]
    monkeypatch.setattr(zsc, "accuracy", accuracy)
    model, _, preprocess = open_clip.create_model_and_transforms(ws["model"])
    dataset = build_dataset("wds/shapes", root=root, transform=preprocess, split="test")
    loader = torch.utils.data.DataLoader(dataset.batched(16), batch_size=None, shuffle=False)
    loader.dataset.classes = dataset.classes
    theirs = zsc.evaluate(model.eval(), loader, open_clip.get_tokenizer(ws["model"]), dataset.classes, dataset.templates,
                          device="cpu", amp=False)
    assert ours["top1"] == pytest.approx(theirs["acc1"], abs=1e-12)
    assert ours["top5"] == pytest.approx(theirs["acc5"], abs=1e-12)
    assert ours["per_class_mean"] == pytest.approx(theirs["mean_per_class_recall"], abs=1e-12)


def _save_images(folder, n, seed, size=32):
    """``n`` shape images as JPEG files ``folder/<class name>/i.jpg``; returns [(path, class)]."""
    out = []
    for i in range(n):
        img, cls, bg = render_sample(i, seed=seed, biased=False, image_size=size)
        d = os.path.join(folder, CLASSNAMES[cls])
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"{i}.jpg")
        img.save(path, quality=90)
        out.append((path, cls, bg))
    return out


def test_layouts_suites_tables_plots_and_run_folders(ws, tmp_path):
    data = tmp_path / "data"
    # a folder of class subfolders, a PACS-like domains tree, a Waterbirds-like release, CIFAR-10.02-like files
    _save_images(str(data / "folder"), 12, seed=1)
    _save_images(str(data / "folder2"), 8, seed=2)
    for d, domain in enumerate(("photo", "sketch")):
        _save_images(str(data / "pacs" / domain), 8, seed=10 + d)
    for c in CLASSNAMES:  # every domain needs every class folder
        for domain in ("photo", "sketch"):
            os.makedirs(data / "pacs" / domain / c, exist_ok=True)
    wb = data / "waterbirds"
    rows = ["img_id,img_filename,y,split,place,place_filename"]
    for i in range(12):
        img, cls, bg = render_sample(i, seed=4, biased=False, image_size=32)
        os.makedirs(wb / "001.bird", exist_ok=True)
        img.save(wb / "001.bird" / f"{i}.jpg")
        rows.append(f"{i},001.bird/{i}.jpg,{cls % 2},{2 if i < 10 else 0},{bg % 2},x")
    (wb / "metadata.csv").write_text("\n".join(rows) + "\n")
    cifar = data / "cifar"
    os.makedirs(cifar / "cifar-10-batches-py")
    rng = np.random.default_rng(0)
    with open(cifar / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3, 4, 5]}, f)
    np.savez(cifar / "cifar102_test.npz", images=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), labels=np.array([6, 7, 8, 9]))
    suite = tmp_path / "suite.yaml"
    suite.write_text("id: folder\nsets:\n"
                     "  folder: data/folder\n"
                     "  folder2: {root: data/folder2, templates: openai}\n"
                     f"  shapes: {{root: '{ws['shards']}', classnames: {ws['names']}, templates: openai}}\n"
                     "  pacs: data/pacs\n"
                     "  waterbirds: {root: data/waterbirds}\n"
                     "  cifar10.02: data/cifar\n")
    specs, id_set = load_suite(str(suite))
    assert id_set == "folder"
    assert [s.name for s in specs] == ["folder", "folder2", "shapes", "pacs", "waterbirds", "cifar10.02"]
    prepared = {s.name: prepare_set(s) for s in specs}
    assert {n: p.format for n, p in prepared.items()} == {"folder": "folder", "folder2": "folder", "shapes": "wds", "pacs": "domains",
                                                         "waterbirds": "waterbirds", "cifar10.02": "cifar10.02"}
    assert prepared["pacs"].group_names == ["photo", "sketch"] and len(prepared["pacs"].items) == 16
    assert len(prepared["waterbirds"].items) == 10  # the test split only
    wb_items = prepared["waterbirds"].items
    assert all(it.group == 2 * it.label + (render_sample(int(os.path.basename(it.ref)[:-4]), seed=4, biased=False,
                                                         image_size=32)[2] % 2) for it in wb_items)
    assert sorted(it.group for it in prepared["cifar10.02"].items) == [0] * 6 + [1] * 4

    # a training run folder with two epoch checkpoints (and epoch_latest, which is not evaluated twice)
    run = tmp_path / "logs" / "ft"
    os.makedirs(run / "checkpoints")
    (run / "params.txt").write_text(f"batch_size: 4\nmodel: {ws['model']}\n")
    for epoch, seed in ((1, 5), (2, 6)):
        model, _ = build_tiny_model(seed)
        torch.save({"epoch": epoch, "name": "ft", "state_dict": {"module." + k: v for k, v in model.state_dict().items()}},
                   run / "checkpoints" / f"epoch_{epoch}.pt")
    shutil.copy(run / "checkpoints" / "epoch_2.pt", run / "checkpoints" / "epoch_latest.pt")

    out = tmp_path / "out" / "results.jsonl"
    assert run_eval("--model", ws["model"], "--run", run, "--suite", suite, "--out", out) == 0
    records = records_of(out)
    assert [(r["checkpoint"], r["dataset"]) for r in records][:7] == [
        ("ft/epoch_1", "folder"), ("ft/epoch_1", "folder2"), ("ft/epoch_1", "shapes"), ("ft/epoch_1", "pacs"),
        ("ft/epoch_1", "waterbirds"), ("ft/epoch_1", "cifar10.02"), ("ft/epoch_2", "folder")]
    assert len(records) == 12
    r = records[4]
    for key in ("checkpoint", "dataset", "top1", "top5", "worst_group", "groups", "ece", "n", "settings", "per_class"):
        assert key in r
    assert set(r["groups"]) <= {"landbird on land", "landbird on water", "waterbird on land", "waterbird on water"}
    assert r["worst_group"] == min(r["groups"].values()) and r["top5"] is None  # 2 classes
    assert records[2]["settings"]["num_templates"] == 80 and records[2]["top5"] is not None
    assert records[5]["groups"].keys() == {"cifar10", "cifar10.2"}

    table = (tmp_path / "out" / "results.md").read_text().splitlines()
    assert table[0] == ("| checkpoint | folder (ID) | folder2 | OOD avg | shapes WG | shapes Avg | pacs WG | pacs Avg | "
                        "waterbirds WG | waterbirds Avg | cifar10.02 WG | cifar10.02 Avg |")
    assert table[2].startswith("| ft/epoch_1 | ") and table[3].startswith("| ft/epoch_2 | ")
    cells = table[2].split(" | ")
    assert cells[1] == f"{100 * records[0]['top1']:.1f}" and cells[2] == cells[3] == f"{100 * records[1]['top1']:.1f}"
    assert cells[4] == f"{100 * records[2]['worst_group']:.1f}"
    plots = sorted(os.listdir(tmp_path / "out" / "results_plots"))
    assert plots == ["cifar10.02_groups.png", "pacs_groups.png", "shapes_groups.png", "waterbirds_groups.png"]
    with Image.open(tmp_path / "out" / "results_plots" / "pacs_groups.png") as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_imagenet_r_builtin_restricts_to_its_200_classes(ws, tmp_path):
    from open_clip_starft.eval.sets import builtin_subset
    root = tmp_path / "imagenet-r"
    subset = builtin_subset("imagenet-r")
    for j in range(200):
        os.makedirs(root / f"n{j:08d}")  # 200 WordNet-id folders: label j is the subset's j-th class
    for j, (img, *_) in zip((0, 57, 199), (render_sample(i, seed=2, image_size=32) for i in range(3))):
        img.save(root / f"n{j:08d}" / "a.jpg")
    out = tmp_path / "r.jsonl"
    assert run_eval("--model", ws["model"], "--set", f"imagenet-r={root}", "--templates", "single", "--out", out, "--no-plots") == 0
    (r,) = records_of(out)
    assert r["settings"]["subset"] == "imagenet-r" and r["settings"]["num_classes"] == 200 and r["n"] == 3

    # by hand: the head over the 200 subset names only
    model, _, preprocess = open_clip.create_model_and_transforms(ws["model"])
    tok = open_clip.get_tokenizer(ws["model"])
    names = [open_clip.IMAGENET_CLASSNAMES[i] for i in subset]
    with torch.no_grad():
        text = model.encode_text(tok([f"a photo of a {n}." for n in names]), normalize=True)
        imgs = torch.stack([preprocess(Image.open(root / f"n{j:08d}" / "a.jpg").convert("RGB")) for j in (0, 57, 199)])
        pred = (model.encode_image(imgs, normalize=True) @ text.T).argmax(1)
    assert r["top1"] == pytest.approx(float((pred == torch.tensor([0, 57, 199])).double().mean()))


def test_bad_input_is_one_line(ws, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    rc = run_eval("--model", ws["model"], "--data", tmp_path / "nowhere", "--out", out)
    one_line_error(capsys, rc, "'nowhere'", "does not exist")

    folder = tmp_path / "three"
    _save_images(str(folder), 8, seed=3)
    os.rename(folder / CLASSNAMES[3], folder / "pentagon")  # a folder that names none of the class names
    rc = run_eval("--model", ws["model"], "--data", folder, "--classnames", ws["names"], "--out", out)
    one_line_error(capsys, rc, "1 class folder(s)", "name no class of the 6 class names", "'pentagon'", ws["names"])

    two = tmp_path / "two.txt"
    two.write_text("circle\nsquare\n")
    rc = run_eval("--model", ws["model"], "--data", ws["shards"], "--classnames", two, "--out", out)
    one_line_error(capsys, rc, "outside the 2 class names", str(two))

    rc = run_eval("--model", ws["model"], "--data", ws["shards"], "--classnames", ws["names"], "--subset", "0,1,6", "--out", out)
    one_line_error(capsys, rc, "class id 6", "out of range for the 6 class names")

    other = open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
                           text_cfg={"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1})
    torch.save(other.state_dict(), tmp_path / "other.pt")
    rc = run_eval("--model", ws["model"], "--pretrained", tmp_path / "other.pt", "--data", ws["shards"],
                  "--classnames", ws["names"], "--out", out)
    one_line_error(capsys, rc, "other.pt", "is not a local-dir:", "pass the --model it was trained with")

    bad_suite = tmp_path / "s.json"
    bad_suite.write_text('{"sets": {"x": {"root": "a", "colour": 1}}}')
    rc = run_eval("--model", ws["model"], "--suite", bad_suite, "--out", out)
    one_line_error(capsys, rc, "unknown key 'colour'")


def test_unreadable_images_are_counted_not_fatal(ws, tmp_path):
    folder = tmp_path / "f"
    _save_images(str(folder), 8, seed=5)
    (folder / CLASSNAMES[0] / "broken.jpg").write_bytes(b"not an image")
    p = prepare_set(EvalSetSpec(name="f", root=str(folder)))
    _, _, preprocess = open_clip.create_model_and_transforms(ws["model"])
    got = list(batches(p, preprocess, batch_size=4))
    assert sum(len(b[1]) for b in got) == 8 and sum(len(b[4]) for b in got) == 1
    assert "broken.jpg" in [s for b in got for s in b[4]][0]


def test_objectnet_release_maps_to_imagenet_classes(ws, tmp_path):
    from open_clip_starft.eval.evaluator import Evaluator
    root = tmp_path / "objectnet-1.0"
    os.makedirs(root / "mappings")
    (root / "mappings" / "folder_to_objectnet_label.json").write_text(json.dumps({"fa": "Alpha", "fb": "Beta", "fc": "Gamma"}))
    (root / "mappings" / "objectnet_to_imagenet_1k.json").write_text(json.dumps({"Alpha": "tench; goldfish", "Beta": "great white shark"}))
    (root / "mappings" / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps({str(i): i for i in range(4)}))
    (root / "mappings" / "imagenet_to_label_2012_v2").write_text("tench\ngoldfish\ngreat white shark\ntiger shark\n")
    for k, folder in enumerate(("fa", "fb", "fc")):
        os.makedirs(root / "images" / folder)
        for i in range(2):
            img, *_ = render_sample(10 * k + i, seed=3, image_size=36)
            img.save(root / "images" / folder / f"{i}.png")
    p = prepare_set(EvalSetSpec(name="objectnet", root=str(root), templates="single"))
    assert p.format == "objectnet" and p.class_map == [[0, 1], [2]] and p.classnames == ["alpha", "beta"]
    assert len(p.items) == 4 and p.crop_border == 2  # folder fc maps to no ImageNet class

    model, _, preprocess = open_clip.create_model_and_transforms(ws["model"])
    tok = open_clip.get_tokenizer(ws["model"])
    r = Evaluator(model, tok, preprocess).evaluate(p)
    with torch.no_grad():
        text = model.encode_text(tok([f"a photo of a {n}." for n in ("tench", "goldfish", "great white shark")]), normalize=True)
        imgs = torch.stack([preprocess(Image.open(it.ref).convert("RGB").crop((2, 2, 34, 34))) for it in p.items])
        sims = model.encode_image(imgs, normalize=True) @ text.T
    pred = torch.stack([sims[:, :2].max(1).values, sims[:, 2]], 1).argmax(1)
    assert r["top1"] == pytest.approx(float((pred == torch.tensor([it.label for it in p.items])).double().mean()))


def test_a_truncated_shard_is_named_not_scored_on_half_its_images(ws, tmp_path, capsys):
    import tarfile
    paths = write_shards(str(tmp_path / "cut"), 32, seed=4, biased=False, image_size=32, samples_per_shard=16)
    with open(paths[1], "rb") as f:
        data = f.read()
    with tarfile.open(paths[1]) as tar:
        members = tar.getmembers()
    at_header = members[len(members) // 2].offset  # cut where a member header starts: tarfile ends quietly
    for cut, needles in ((at_header, ("gave 8 samples but its sizes.json lists 16", "truncated")),
                         (int(len(data) * 0.45), ("cannot read shard", "truncated or damaged"))):
        with open(paths[1], "wb") as f:
            f.write(data[:cut])
        rc = run_eval("--model", ws["model"], "--data", brace_pattern(paths), "--classnames", ws["names"],
                      "--out", tmp_path / "r.jsonl", "--no-plots")
        one_line_error(capsys, rc, os.path.basename(paths[1]), *needles)
        assert not (tmp_path / "r.jsonl").exists()


def test_a_truncated_shard_without_sizes_json_is_named_too(ws, tmp_path, capsys):
    import tarfile
    paths = write_shards(str(tmp_path / "cut"), 32, seed=4, biased=False, image_size=32, samples_per_shard=16)
    os.remove(tmp_path / "cut" / "sizes.json")  # nothing to count against: the archive's end must be checked
    with tarfile.open(paths[1]) as tar:
        members = tar.getmembers()
    with open(paths[1], "rb") as f:
        data = f.read()
    with open(paths[1], "wb") as f:  # cut where a member header starts: tarfile ends quietly
        f.write(data[:members[len(members) // 2].offset])
    rc = run_eval("--model", ws["model"], "--data", brace_pattern(paths), "--classnames", ws["names"],
                  "--out", tmp_path / "r.jsonl", "--no-plots")
    one_line_error(capsys, rc, os.path.basename(paths[1]), "cannot read shard", "truncated or damaged")
    assert not (tmp_path / "r.jsonl").exists()


def test_16_bit_images_are_scaled_not_white(tmp_path):
    from open_clip_starft.eval.sets import open_image
    folder = tmp_path / "deep" / "circle"
    os.makedirs(folder)
    ramp = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 40)  # 0 .. 40920 of 65535
    Image.fromarray(ramp).save(folder / "a.png")
    assert Image.open(folder / "a.png").mode.startswith("I;16")
    p = prepare_set(EvalSetSpec(name="deep", root=str(tmp_path / "deep"), classnames=["circle"]))
    image = np.asarray(open_image(p.items[0].ref))
    assert image.shape == (32, 32, 3) and image.max() == round(40920 / 257) and image.min() == 0


def test_a_local_dir_model_without_weights_is_refused_not_evaluated_at_random(ws, tmp_path, capsys):
    from open_clip_starft.eval import wise
    bare = tmp_path / "bare"
    os.makedirs(bare)
    shutil.copy(os.path.join(ws["model"].removeprefix("local-dir:"), "open_clip_config.json"), bare)
    rc = run_eval("--model", f"local-dir:{bare}", "--data", ws["shards"], "--classnames", ws["names"], "--out", tmp_path / "r.jsonl")
    one_line_error(capsys, rc, "holds no weights file", "random weights")
    rc = wise.main(["--model", f"local-dir:{bare}", "--fine-tuned", str(tmp_path / "x.pt"), "--data", ws["shards"],
                    "--classnames", ws["names"], "--out", str(tmp_path / "w")])
    one_line_error(capsys, rc, "has no weights of its own", "--zero-shot")


def test_a_pretrained_value_that_is_no_file_is_refused_not_ignored(ws, tmp_path, capsys, monkeypatch):
    from open_clip_starft.eval.models import check_weights_value
    monkeypatch.chdir(tmp_path)  # "epoch_2.pt" is looked up here, where there is none
    out = tmp_path / "r.jsonl"
    rc = run_eval("--model", ws["model"], "--pretrained", "ft=epoch_2.pt", "--data", ws["shards"], "--classnames", ws["names"],
                  "--out", out)
    one_line_error(capsys, rc, "--pretrained", "'epoch_2.pt' does not exist", str(tmp_path), "only from files")
    assert not out.exists()  # no row "ft" with the zero-shot model's score
    rc = run_eval("--model", ws["model"], "--pretrained", f"ft={tmp_path}", "--data", ws["shards"], "--out", out)
    one_line_error(capsys, rc, "is a folder, not a weights file")
    rc = run_eval("--model", "RN50", "--pretrained", "zs=laion9b", "--data", ws["shards"], "--out", out)
    one_line_error(capsys, rc, "'laion9b' is neither an existing file nor a pretrained tag of RN50", "openai")
    check_weights_value("openai", "RN50")  # a tag OpenCLIP knows for that model is accepted (not downloaded here)
    (tmp_path / "epoch_2.pt").write_bytes(b"")
    check_weights_value("epoch_2.pt", ws["model"])  # an existing file is taken (and read by the safe reader)


def test_a_run_with_an_empty_params_txt_is_named(ws, tmp_path, capsys):
    run = tmp_path / "logs" / "cut"
    os.makedirs(run / "checkpoints")
    torch.save(build_tiny_model(1)[0].state_dict(), run / "checkpoints" / "epoch_1.pt")
    (run / "params.txt").write_text("")  # a write cut short by a full disk
    rc = run_eval("--run", run, "--data", ws["shards"], "--classnames", ws["names"], "--out", tmp_path / "r.jsonl")
    one_line_error(capsys, rc, f"{run / 'params.txt'} is empty (0 bytes")
    assert run_eval("--run", run, "--model", ws["model"], "--data", ws["shards"], "--classnames", ws["names"],
                    "--out", tmp_path / "r.jsonl", "--no-plots") == 0  # naming the model explicitly works


def test_results_in_clip_benchmark_format_and_tensorboard(ws, tmp_path):
    import argparse
    import csv
    from clip_benchmark.cli import main_build
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "r.jsonl"
    assert run_eval("--model", ws["model"], "--pretrained", f"zs={ws['model'].removeprefix('local-dir:')}/open_clip_model.safetensors",
                    "--set", f"shapes={ws['shards']}", "--classnames", ws["names"], "--out", out, "--no-plots",
                    "--results-format", "clip_benchmark", "--report-to", "tensorboard") == 0
    (record,) = records_of(out)
    main_build(argparse.Namespace(files=[str(tmp_path / "r_clip_benchmark")], output=str(tmp_path / "b.csv")))
    with open(tmp_path / "b.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["dataset"] == "shapes" and row["pretrained"] == "zs" and float(row["acc1"]) == record["top1"]
    assert float(row["acc5"]) == record["top5"] and float(row["mean_per_class_recall"]) == record["per_class_mean"]
    events = EventAccumulator(str(tmp_path / "r_tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("eval/shapes/worst_group")] == pytest.approx([record["worst_group"]])
