"""Issue 28, third pass of bad inputs: evaluation, validation, export and descriptor files are never
silently wrong. One test (or more) per item, each building its own data, each failing on the code
before its fix: class folders labelled by name (1), the selection metric checked on resume (2) and
against the set (3), CLIP_benchmark file names unique (5), descriptor files read by their format (6),
prompts that lose their class name to truncation refused (7), NaN/Inf weights refused (8), an empty
set named (14), no local path in shared files (15), eval at the run's precision (16), strict JSON
(17), the architecture and group names in cards and records (18), workers as the machine has (19),
exported weights readable like the other files."""
import json
import os

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from open_clip_starft.demo.data import BACKGROUNDS, CLASSNAMES, brace_pattern, write_shards
from open_clip_starft.errors import StarftError
from open_clip_starft.eval.evaluator import Evaluator
from open_clip_starft.eval.sets import EvalSetSpec, prepare_set

from runs import one_line_error as run_refused, run, train_args, workspace


def strict_json(text):
    """``json.loads`` that refuses NaN and ±Infinity, as strict (RFC 8259) parsers do."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def ws(tiny_data, tmp_path_factory):
    """The session's tiny model and class names (circle, square, triangle, cross: not in sorted order), with a
    folder of this module's own."""
    return {"root": tmp_path_factory.mktemp("reliability"), "classes": tiny_data["classes"], "model": tiny_data["model"]}


@pytest.fixture(scope="module")
def folder_set(ws):
    """A small eval set: a class-subfolder folder, two images of each of the four classes."""
    for i, c in enumerate(CLASSNAMES):
        save_images(ws["root"] / "set" / c, 2, seed=100 + i)
    return str(ws["root"] / "set")


def one_line_error(capsys, rc, *needles):
    """The command failed with exit 2 and one line ``open-clip-starft: error: …`` holding every needle."""
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("open-clip-starft: error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def save_images(folder, n, seed):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        paths.append(os.path.join(folder, f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def reference_predictions(model_name, paths, classnames, template="a photo of a {}."):
    """Zero-shot predictions computed here, independently of the evaluator: OpenCLIP's model, its eval
    transform and tokenizer, one template, arg-max of image · text features."""
    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    with torch.no_grad():
        text = model.encode_text(tokenizer([template.replace("{}", c) for c in classnames]), normalize=True)
        images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
        return (model.encode_image(images, normalize=True) @ text.T).argmax(dim=1).tolist()


def evaluator_of(model_name, precision="fp32"):
    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    return Evaluator(model.eval(), open_clip.get_tokenizer(model_name), preprocess, precision=precision,
                     batch_size=16, workers=0)


# -- item 1: class folders are labelled by name --------------------------------------------------------
def test_class_folders_are_labelled_by_their_names_not_their_sorted_position(ws, tmp_path):
    # all four classes: sorted folders (circle, cross, square, triangle) are not the class order
    root = tmp_path / "all"
    paths = {c: save_images(root / c, 3, seed=i) for i, c in enumerate(CLASSNAMES)}
    prepared = prepare_set(EvalSetSpec(name="all", root=str(root), classnames=ws["classes"]))
    label_of = {os.path.basename(os.path.dirname(it.ref)): it.label for it in prepared.items}
    assert label_of == {c: CLASSNAMES.index(c) for c in CLASSNAMES}  # cross/ is class 3, never 1 ("square")

    # only some classes (and an empty folder): still labelled by name and scored over the classes present
    root = tmp_path / "some"
    cross = save_images(root / "cross", 6, seed=10)
    square = save_images(root / "square", 2, seed=11)
    (root / "circle").mkdir()
    prepared = prepare_set(EvalSetSpec(name="some", root=str(root), classnames=ws["classes"]))
    assert sorted({(os.path.basename(os.path.dirname(it.ref)), it.label) for it in prepared.items}) == \
        [("cross", 3), ("square", 1)]
    assert prepared.settings["classes_without_images"] == ["circle", "triangle"]
    assert "no image of 2 of its 4 classes: circle, triangle" in prepared.describe_missing_classes()
    record = evaluator_of(ws["model"]).evaluate(prepared)
    predicted = reference_predictions(ws["model"], cross + square, CLASSNAMES)
    truth = [3] * len(cross) + [1] * len(square)
    expected = {"cross": np.mean([p == 3 for p in predicted[:6]]), "square": np.mean([p == 1 for p in predicted[6:]])}
    assert record["per_class"] == pytest.approx(expected, abs=1e-12)
    assert record["top1"] == pytest.approx(np.mean([p == t for p, t in zip(predicted, truth)]), abs=1e-12)
    assert record["worst_group"] == record["top1"]  # one group

    # a folder that names no class is refused, all such folders named
    save_images(root / "hexagon", 1, seed=12)
    save_images(root / "Star", 1, seed=13)
    with pytest.raises(StarftError, match=r"2 class folder\(s\) .* name no class .*'Star', 'hexagon'"):
        prepare_set(EvalSetSpec(name="some", root=str(root), classnames=ws["classes"]))


# -- item 17: strict JSON everywhere ------------------------------------------------------------------------
def test_every_json_we_write_is_strict_an_undefined_metric_is_null(tmp_path):
    from open_clip_starft.eval.report import write_clip_benchmark, write_jsonl
    record = {"checkpoint": "ft", "dataset": "val", "top1": 0.5, "top5": None, "worst_group": 0.25, "avg_group": 0.4,
              "per_class_mean": 0.5, "ece": float("nan"), "n": 8, "groups": {"0": 0.25, "1": float("inf")},
              "settings": {"model": "local-dir:/x/tiny"}}
    written = write_clip_benchmark([record], str(tmp_path / "cb"))
    result = strict_json(open(written[0]).read())
    assert result["metrics"]["acc5"] is None and result["metrics"]["ece"] is None and result["metrics"]["acc1"] == 0.5
    write_jsonl([record], str(tmp_path / "r.jsonl"))
    line = strict_json(open(tmp_path / "r.jsonl").read())
    assert line["ece"] is None and line["groups"] == {"0": 0.25, "1": None}
    from open_clip_starft.data.files import json_line, write_json
    write_json(str(tmp_path / "x.json"), {"a": [1.0, float("-inf"), (float("nan"),)]})
    assert strict_json(open(tmp_path / "x.json").read()) == {"a": [1.0, None, [None]]}
    assert strict_json(json_line({"v": float("nan")})) == {"v": None}


# -- item 8: NaN or Inf weights are refused in every reader --------------------------------------------------
def damaged_checkpoint(ws, folder, value, key="visual.transformer.resblocks.1.mlp.c_fc.weight"):
    """A training checkpoint of the tiny model (with the run's params.txt) where one weight of ``key`` is ``value``."""
    model = open_clip.create_model(ws["model"])
    state = model.state_dict()
    state[key][0, 0] = value
    os.makedirs(folder / "checkpoints", exist_ok=True)
    (folder / "params.txt").write_text(f"model: {ws['model']}\nprecision: fp32\n")
    path = folder / "checkpoints" / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "damaged", "state_dict": state}, path)
    return str(path), key


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_eval_wise_sweep_and_export(ws, folder_set, tmp_path, capsys, value):
    from open_clip_starft.eval import cli as eval_cli, wise
    from open_clip_starft.tools.export import main as export_main
    from open_clip_starft.tools.sweep import WeightsScorer
    path, key = damaged_checkpoint(ws, tmp_path / "run", value)
    kind = "NaN" if value != value else "Inf"
    data = ["--data", folder_set, "--classnames", ws["classes"], "--workers", "0"]
    rc = eval_cli.main(["--model", ws["model"], "--pretrained", path, *data, "--out", str(tmp_path / "e.jsonl")])
    one_line_error(capsys, rc, path, f"{kind} in {key!r}")
    if kind == "Inf":  # the other readers share the one reader (eval.models.checkpoint_state): NaN checks them
        return
    rc = eval_cli.main(["--run", str(tmp_path / "run"), *data, "--out", str(tmp_path / "r.jsonl")])
    one_line_error(capsys, rc, path, key)
    rc = wise.main(["--model", ws["model"], "--fine-tuned", path, "--alphas", "0,0.5,1", *data, "--out",
                    str(tmp_path / "wise")])
    one_line_error(capsys, rc, path, key)
    rc = export_main(["--checkpoint", path, "--out", str(tmp_path / "exported")])
    one_line_error(capsys, rc, path, key)
    with pytest.raises(StarftError, match=f"{kind} in {key!r}"):
        WeightsScorer(ws["model"], path, {"val": folder_set}, ws["classes"])
    assert not any(os.path.exists(tmp_path / f) for f in ("e.jsonl", "r.jsonl", "exported")) and \
        not os.path.exists(tmp_path / "wise" / "wise.json")


# -- item 19: data-loader workers default to what the machine has ---------------------------------------------
@pytest.mark.parametrize("cpus, expected", [(2, 2), (1, 1), (64, 4)])
def test_workers_default_to_the_cpus_this_process_has(monkeypatch, cpus, expected):
    from open_clip_starft.eval import cli as eval_cli, wise
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    for args in (eval_cli.build_parser().parse_args(["--out", "x"]),
                 wise.build_parser().parse_args(["--model", "m", "--fine-tuned", "f", "--out", "x"])):
        eval_cli.check_run_args(args)  # where both commands fill in the defaults that need the machine
        assert args.workers == expected
    args = eval_cli.build_parser().parse_args(["--out", "x", "--workers", "3"])
    eval_cli.check_run_args(args)
    assert args.workers == 3  # a given value is kept


# -- a trained run with --starft-val and --starft-select, at OpenCLIP's amp (items 2, 15, 16, 18) ----------------
GROUP_NAMES = [f"{c} on {b}" for c in CLASSNAMES for b in BACKGROUNDS]  # the demo's group id: class × 4 + background


@pytest.fixture(scope="module")
def amp_run(small_data, tmp_path_factory):
    """A 2-epoch run of the session's ``small_data`` at ``--precision amp`` validated on shards whose 16 groups
    (class × background) are named by a ``group_names.txt`` beside them, keeping best.pt by val:top1."""
    root = tmp_path_factory.mktemp("amp-run")
    w = workspace(small_data, root)
    w["val"] = brace_pattern(write_shards(str(root / "val"), 32, seed=21, biased=False, image_size=32,
                                          samples_per_shard=16))
    (root / "val" / "group_names.txt").write_text("\n".join(GROUP_NAMES) + "\n")
    w["val_args"] = ["--starft-val", f"val={w['val']}", "--precision", "amp"]
    done = run(train_args(w, "amp-run", *w["val_args"], "--starft-select", "val:top1", epochs=2, batch_size=16,
                          workers=0))
    assert done.returncode == 0, done.stderr[-3000:]
    w["run"] = os.path.join(str(root), "logs", "amp-run")
    with open(os.path.join(w["run"], "checkpoints", "results.jsonl")) as f:
        w["logged"] = [strict_json(line) for line in f]  # item 17: strict JSON lines
    return w


def test_eval_of_a_run_is_at_its_precision_and_its_card_says_so_names_its_architecture_and_no_path(amp_run, tmp_path):
    from open_clip_starft.eval import cli as eval_cli
    from open_clip_starft.tools.export import main as export_main
    out = tmp_path / "r.jsonl"
    assert eval_cli.main(["--run", amp_run["run"], "--epochs", "2", "--data", amp_run["val"], "--classnames",
                          amp_run["classes"], "--batch-size", "16", "--workers", "0", "--out", str(out),
                          "--no-plots", "--no-progress"]) == 0
    (record,) = [strict_json(line) for line in open(out)]
    assert record["settings"]["precision"] == "amp"  # item 16: the run's precision, recorded in the row
    logged = next(r for r in amp_run["logged"] if r["epoch"] == 2 and r["set"] == "val")
    assert (record["top1"], record["worst_group"], record["ece"]) == (logged["top1"], logged["worst_group"], logged["ece"])
    # item 18: groups named by the set's group_names.txt, in training's log and in eval's records
    assert set(logged["groups"]) <= set(GROUP_NAMES) and len(logged["groups"]) > 1
    assert set(record["groups"]) == set(logged["groups"])

    ckpt = os.path.join(amp_run["run"], "checkpoints", "epoch_2.pt")
    folder = tmp_path / "exported"
    assert export_main(["--checkpoint", ckpt, "--out", str(folder), "--results", str(out)]) == 0
    card = (folder / "README.md").read_text()
    # item 15: --starft-val's pattern by its folder's name, no path of this machine anywhere
    training_data = os.path.dirname(amp_run["shards"][0])
    assert str(amp_run["root"]) not in card and training_data not in card and os.path.expanduser("~") + "/" not in card
    assert "val=val" in card
    # item 18: the architecture from the model's config, not the model folder's name ("model")
    assert "**Architecture:** custom CLIP: image tower ViT (2 layers, width 64, patch 8, 32 px); text tower transformer " \
           "(2 layers, width 64, 32 tokens); embedding 32" in card
    # item 16: the card's table says the precision of its rows; the training's is labelled as such
    assert "**Training precision:** amp" in card
    row = next(line for line in card.splitlines() if line.startswith("| shard "))
    assert row.endswith("| 32 | amp |"), row
    # also seen: the weights are readable like the other files (safetensors writes 0600)
    modes = {name: os.stat(folder / name).st_mode & 0o777 for name in os.listdir(folder)}
    assert len(set(modes.values())) == 1 and modes["open_clip_model.safetensors"] & 0o044 == 0o044 & ~_umask(), modes


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# -- item 2: resuming with another selection is refused ----------------------------------------------------
def test_resuming_with_another_selection_metric_is_refused_in_one_line(amp_run, tmp_path):
    import shutil
    more = ["--resume", "latest", "--starft-allow-changed-settings"]
    refused = run(train_args(amp_run, "amp-run", *amp_run["val_args"], "--starft-select", "val:ece", *more, epochs=3,
                             batch_size=16, workers=0))
    run_refused(refused, "--starft-select val:ece", "kept best.pt by val:top1", "resume with --starft-select val:top1",
                status=2)
    assert not os.path.exists(os.path.join(amp_run["run"], "checkpoints", "epoch_3.pt"))
    best = json.load(open(os.path.join(amp_run["run"], "checkpoints", "best.json")))
    assert (best["set"], best["metric"]) == ("val", "top1")

    # a selection added on resume: the epochs already validated would never be candidates
    copy = os.path.join(str(amp_run["root"]), "logs", "no-select")
    shutil.copytree(amp_run["run"], copy)
    for name in ("best.pt", "best.json"):
        os.remove(os.path.join(copy, "checkpoints", name))
    refused = run(train_args(amp_run, "no-select", *amp_run["val_args"], "--starft-select", "val:top1", *more,
                             epochs=3, batch_size=16, workers=0))
    run_refused(refused, "validated after epoch(s) 1, 2 without a selection", status=2)


# -- item 3: a group metric on a set without groups is refused before the first step ------------------------
def test_selecting_a_group_metric_on_a_set_without_groups_is_refused_before_training(amp_run, folder_set):
    result = run(train_args(amp_run, "plain-wg", "--starft-val", f"plain={folder_set}", "--starft-select",
                            "plain:worst_group", epochs=1, batch_size=16, workers=0))
    run_refused(result, "--starft-select plain:worst_group", "'plain' has no groups", "select on top1", status=2)
    folder = os.path.join(str(amp_run["root"]), "logs", "plain-wg", "checkpoints")
    assert not [n for n in (os.listdir(folder) if os.path.isdir(folder) else []) if n.startswith("epoch_")]


# -- item 14: an empty set is named as empty -------------------------------------------------------------------
def test_an_empty_shard_is_named_as_an_empty_set(ws, tmp_path, capsys):
    import tarfile
    from open_clip_starft.eval import cli as eval_cli
    empty = tmp_path / "empty" / "shard-000000.tar"
    empty.parent.mkdir()
    tarfile.open(empty, "w").close()
    rc = eval_cli.main(["--model", ws["model"], "--data", str(empty), "--classnames", ws["classes"], "--workers", "0",
                        "--out", str(tmp_path / "e.jsonl"), "--no-progress"])
    one_line_error(capsys, rc, "eval set 'shard-000000' is empty", "1 file(s) hold no samples", str(empty))


# -- item 5: CLIP_benchmark result files never collide ---------------------------------------------------------
def test_sets_whose_clip_benchmark_files_collide_are_refused_before_scoring(ws, folder_set, tmp_path, capsys):
    from open_clip_starft.eval import cli as eval_cli
    from open_clip_starft.eval.report import write_clip_benchmark
    out = tmp_path / "r.jsonl"
    rc = eval_cli.main(["--model", ws["model"], "--set", f"val x={folder_set}", "--set", f"val_x={folder_set}",
                        "--classnames", ws["classes"], "--workers", "0", "--results-format", "clip_benchmark",
                        "--out", str(out), "--no-plots", "--no-progress"])
    one_line_error(capsys, rc, "set 'val x'", "set 'val_x'", "val_x_model_model_en_zeroshot_classification.json")
    assert not out.exists() and not (tmp_path / "r_clip_benchmark").exists()
    # distinct names: one file each, every record kept
    rc = eval_cli.main(["--model", ws["model"], "--set", f"val-x={folder_set}", "--set", f"val_x={folder_set}",
                        "--classnames", ws["classes"], "--workers", "0", "--results-format", "clip_benchmark",
                        "--out", str(out), "--no-plots", "--no-progress"])
    assert rc == 0 and len(os.listdir(tmp_path / "r_clip_benchmark")) == 2
    for name in os.listdir(tmp_path / "r_clip_benchmark"):  # item 15: files for sharing name no local path
        text = (tmp_path / "r_clip_benchmark" / name).read_text()
        assert ws["model"].removeprefix("local-dir:") not in text and str(tmp_path) not in text
        assert strict_json(text)["model"] == os.path.basename(ws["model"])
    # the writer itself refuses records that would share a file
    record = {"checkpoint": "a b", "dataset": "v", "top1": 1.0, "top5": None, "worst_group": 1.0, "avg_group": 1.0,
              "per_class_mean": 1.0, "ece": 0.0, "n": 1, "settings": {"model": "m"}}
    with pytest.raises(StarftError, match="would both be written to v_a_b_m_en"):
        write_clip_benchmark([record, {**record, "checkpoint": "a_b"}], str(tmp_path / "cb"))
    assert not (tmp_path / "cb").exists()


# -- item 6: descriptor and other list files are read by their documented formats only ------------------------
def test_a_yaml_descriptor_file_is_refused_not_read_as_lines(tmp_path, capsys):
    from open_clip_starft.method.captions import load_classnames, load_templates
    from open_clip_starft.method.descriptors import load_descriptors
    from open_clip_starft.tools.descriptors.cli import main as descriptors_main
    yaml_file = tmp_path / "beach.yaml"
    yaml_file.write_text("- '{} on the beach.'\n- '{} in the snow.'\n")
    assert descriptors_main(["validate", "--concepts", str(yaml_file)]) == 2
    err = capsys.readouterr().err
    assert "is a .yaml file, which is not read" in err and "OK" not in err
    # YAML or JSON inside a .txt file: refused, naming the line, never taken as entries
    as_text = tmp_path / "beach.txt"
    as_text.write_text("# beach\n- '{} on the beach.'\n")
    with pytest.raises(StarftError, match=r"holds YAML \(.*beach.txt:2: a '- ' list item\)"):
        load_descriptors(str(as_text))
    as_text.write_text('["{} on the beach."]\n')
    with pytest.raises(StarftError, match="holds JSON, but a text file is read one entry per line: name it .json"):
        load_descriptors(str(as_text))
    (tmp_path / "beach.json").write_text('["{} on the beach."]\n')
    assert load_descriptors(str(tmp_path / "beach.json")) == ["{} on the beach."]
    # the same reader serves class names and caption templates
    names = tmp_path / "names.yml"
    names.write_text("- circle\n- square\n")
    with pytest.raises(StarftError, match="is a .yml file"):
        load_classnames(str(names))
    listed = tmp_path / "names.txt"
    listed.write_text("- circle\n- square\n")
    with pytest.raises(StarftError, match="holds YAML"):
        load_classnames(str(listed))
    templates = tmp_path / "t.txt"
    templates.write_text("- a photo of a {}.\n")
    with pytest.raises(StarftError, match="holds YAML"):
        load_templates(str(templates))


# -- item 7: a template that cuts the class name off is refused, in eval and in --starft-val alike ----------
LONG_TEMPLATE = "a blurry low resolution grainy photograph taken at night with an old camera, " * 2 + "of a {}."  # 34 tokens


def test_a_template_that_truncates_the_class_name_away_is_refused(ws, amp_run, folder_set, tmp_path, capsys, caplog):
    from open_clip_starft.eval import cli as eval_cli
    tokenizer = open_clip.get_tokenizer(ws["model"])
    assert tokenizer.context_length == 32 and len(tokenizer.encode(LONG_TEMPLATE.replace("{}", ""))) + 2 > 32
    templates = tmp_path / "templates.txt"
    templates.write_text(f"a photo of a {{}}.\n{LONG_TEMPLATE}\n")
    rc = eval_cli.main(["--model", ws["model"], "--data", folder_set, "--classnames", ws["classes"], "--templates",
                        str(templates), "--workers", "0", "--out", str(tmp_path / "e.jsonl"), "--no-progress"])
    one_line_error(capsys, rc, "caption template 'a blurry low resolution", "loses the class name to truncation",
                   "the prompts of 'circle' and 'square' are the same 32 tokens")
    assert not (tmp_path / "e.jsonl").exists()
    result = run(train_args(amp_run, "long-template", "--starft-val", f"plain={folder_set}", "--starft-val-templates",
                            str(templates), epochs=1, batch_size=16, workers=0))
    run_refused(result, "caption template 'a blurry low resolution", "loses the class name to truncation", status=2)
    # a template that is cut but keeps the names apart is allowed with a warning; one that fits passes quietly
    from open_clip_starft.method.captions import check_class_prompts
    cut = "a " + "very " * 24 + "blurry photo of a {}."  # 33 tokens: the final period is cut, the names stay apart
    check_class_prompts(tokenizer, CLASSNAMES, ["a photo of a {}.", cut])
    assert "1 of 4 class prompts" not in caplog.text and "4 of 4 class prompts are longer than" in caplog.text
