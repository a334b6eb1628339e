"""The one evaluator: metrics on known predictions, a run over real shards against a direct computation,
the same numbers from 2 processes (gloo) as from 1, and CLIP_benchmark's aggregation of our results."""
import argparse
import csv
import json
import os

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from open_clip_starft.demo.data import CLASSNAMES, brace_pattern, write_shards
from open_clip_starft.eval.evaluator import Evaluator, share_of
from open_clip_starft.eval.metrics import SampleScores, group_metrics, metrics_of_scores
from open_clip_starft.eval.report import write_clip_benchmark
from open_clip_starft.eval.sets import EvalSetSpec, prepare_set
from open_clip_starft.tools.tiny_model import build_tiny_model


def tiny():
    model, _ = build_tiny_model(seed=3)
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None, force_image_size=32)
    return model.eval(), open_clip.get_tokenizer("ViT-B-32", context_length=32), preprocess


def test_group_metrics_on_known_predictions():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    predictions = torch.tensor([0, 1, 1, 1, 0, 2])
    groups = torch.tensor([5, 5, 6, 6, 7, 7])
    m = group_metrics(predictions, labels, groups)
    assert m["top1"] == pytest.approx(4 / 6)
    assert m["groups"] == {5: 0.5, 6: 1.0, 7: 0.5}
    assert m["worst_group"] == 0.5 and m["avg_group"] == pytest.approx(2 / 3) and m["n"] == 6


def test_metrics_do_not_depend_on_the_order_or_split_of_the_samples():
    g = torch.Generator().manual_seed(0)
    logits, labels, groups = torch.randn(257, 7, generator=g) * 3, torch.randint(0, 7, (257,), generator=g), \
        torch.randint(0, 4, (257,), generator=g)
    whole = metrics_of_scores(SampleScores.from_logits(logits, labels, groups))
    order = torch.randperm(257, generator=g)
    parts = [SampleScores.from_logits(logits[order][i::3], labels[order][i::3], groups[order][i::3]) for i in range(3)]
    assert metrics_of_scores(SampleScores.cat(parts)) == whole  # exactly, ECE included


def test_evaluator_matches_a_direct_computation(tmp_path):
    shards = brace_pattern(write_shards(str(tmp_path), 40, seed=9, biased=False, image_size=32, samples_per_shard=20))
    model, tokenizer, preprocess = tiny()
    prepared = prepare_set(EvalSetSpec(name="s", root=shards, format="wds", classnames=list(CLASSNAMES)))
    got = Evaluator(model, tokenizer, preprocess, batch_size=16).evaluate(prepared)
    assert got["n"] == 40 and got["skipped"] == 0

    import webdataset as wds
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pilrgb").to_tuple("jpg", "cls", "group"))
    with torch.no_grad():
        text = model.encode_text(tokenizer([f"a photo of a {c}." for c in CLASSNAMES]), normalize=True)
        images = torch.stack([preprocess(img) for img, _, _ in samples])
        logits = model.logit_scale.exp() * model.encode_image(images, normalize=True) @ text.T
    labels = torch.tensor([int(c) for _, c, _ in samples])
    groups = torch.tensor([int(g) for _, _, g in samples])
    want = metrics_of_scores(SampleScores.from_logits(logits, labels, groups))
    for key in ("top1", "worst_group", "avg_group", "per_class_mean", "n"):
        assert got[key] == want[key], key
    assert got["ece"] == pytest.approx(want["ece"], abs=1e-6)
    assert got["groups"] == {str(g): acc for g, acc in want["groups"].items()}


def test_share_of_splits_items_and_shards_without_overlap(tmp_path):
    shards = brace_pattern(write_shards(str(tmp_path), 60, seed=2, biased=False, image_size=32, samples_per_shard=20))
    prepared = prepare_set(EvalSetSpec(name="s", root=shards, format="wds", classnames=list(CLASSNAMES)))
    parts = [share_of(prepared, r, 2) for r in range(2)]
    assert sorted(u for p in parts for u in p.shards) == sorted(prepared.shards)
    few = [share_of(prepared, r, 4) for r in range(4)]  # 3 shards, 4 processes: process 0 reads them all
    assert few[0].shards == prepared.shards and all(p.items == [] for p in few[1:])


def _ddp_worker(rank, init_file, shards, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model, tokenizer, preprocess = tiny()
    for name, root in (("shards", shards), ("folder", os.path.join(out_dir, "folder"))):
        prepared = prepare_set(EvalSetSpec(name=name, root=root, classnames=list(CLASSNAMES)))
        record = Evaluator(model, tokenizer, preprocess, batch_size=7).evaluate(prepared, distributed=True)
        with open(os.path.join(out_dir, f"{name}-rank{rank}.json"), "w") as f:
            json.dump(record, f)
    dist.destroy_process_group()


@pytest.mark.e2e
def test_two_processes_give_the_numbers_of_one(tmp_path):
    shards = brace_pattern(write_shards(str(tmp_path / "wds"), 60, seed=4, biased=False, image_size=32,
                                        samples_per_shard=15))
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(1)
    for i in range(23):  # an odd count: the processes' shares differ in size
        folder = tmp_path / "folder" / CLASSNAMES[i % len(CLASSNAMES)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), shards, str(tmp_path)), nprocs=2, join=True)
    model, tokenizer, preprocess = tiny()
    for name, root in (("shards", shards), ("folder", str(tmp_path / "folder"))):
        prepared = prepare_set(EvalSetSpec(name=name, root=root, classnames=list(CLASSNAMES)))
        one = Evaluator(model, tokenizer, preprocess, batch_size=7).evaluate(prepared)
        for rank in range(2):
            two = json.loads((tmp_path / f"{name}-rank{rank}.json").read_text())
            assert two["n"] == one["n"] == (60 if name == "shards" else 23)
            for key in ("top1", "top5", "worst_group", "avg_group", "per_class_mean", "groups", "per_class"):
                assert two[key] == one[key], (name, key)
            assert two["ece"] == pytest.approx(one["ece"], abs=1e-6)


def test_clip_benchmark_build_reads_our_results(tmp_path):
    from clip_benchmark.cli import main_build
    shards = brace_pattern(write_shards(str(tmp_path / "wds"), 20, seed=5, biased=False, image_size=32))
    model, tokenizer, preprocess = tiny()
    prepared = prepare_set(EvalSetSpec(name="shapes", root=shards, format="wds", classnames=list(CLASSNAMES)))
    record = Evaluator(model, tokenizer, preprocess).evaluate(prepared, label="ft", settings={"model": "local-dir:/x/tiny"})
    paths = write_clip_benchmark([record], str(tmp_path / "cb"))
    assert [os.path.basename(p) for p in paths] == ["shapes_ft_tiny_en_zeroshot_classification.json"]
    main_build(argparse.Namespace(files=[str(tmp_path / "cb")], output=str(tmp_path / "benchmark.csv")))
    with open(tmp_path / "benchmark.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["dataset"] == "shapes" and row["model_fullname"] == "tiny ft"
    assert float(row["acc1"]) == record["top1"] and float(row["mean_per_class_recall"]) == record["per_class_mean"]
    assert float(row["worst_group_acc"]) == record["worst_group"]
