"""Issue 28, the training side: bad input to the training entry point, each case on data the test makes
itself. Every dropped sample counts (item 9); nothing is written before the flags, the data pattern and the
reporters are checked, and a refused run leaves nothing behind (10, 11, 13); ``best.pt`` is no ``--resume``
file (12); a finished run says so (20); a killed ``best.pt`` write is cleaned up on resume; the memory
layout is no setting."""
import glob
import importlib.util
import io
import json
import os
import re
import tomllib
from types import SimpleNamespace

import open_clip
import pytest
import torch
from torchvision.transforms import PILToTensor

from open_clip_starft.data.checks import LabelStats
from open_clip_starft.data.samples import brace_pattern, write_shards
from open_clip_starft.data.training import get_wds_train_data
from open_clip_starft.demo.data import CLASSNAMES, render_sample
from open_clip_starft.demo.data import write_shards as demo_shards
from open_clip_starft.errors import DataError, StarftError
from open_clip_starft.host.checkpoint import load_resume
from open_clip_starft.host.params import build_parser, starft_settings
from open_clip_starft.host.state import RunState, changes
from open_clip_starft.method.captions import CaptionBuilder

from runs import ROOT, one_line_error, run, train_args, workspace

TOKENIZER = open_clip.get_tokenizer("ViT-B-32")


def jpeg_samples(n, *, truncated=()):
    """``n`` 16-px JPEG samples with ``cls``; those in ``truncated`` cut to half their bytes."""
    for i in range(n):
        image, cls, _ = render_sample(i, seed=2, image_size=16)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        data = buf.getvalue()
        yield {"__key__": f"s{i:05d}", "jpg": data[:len(data) // 2] if i in truncated else data, "cls": cls}


def wds_data(pattern, *, batch_size, num_samples, max_skipped=0.01):
    args = SimpleNamespace(train_data=pattern, train_num_samples=num_samples, dataset_resampled=False,
                           train_data_upsampling_factors=None, workers=0, world_size=1, seed=3, rank=0,
                           batch_size=batch_size, starft_max_skipped_fraction=max_skipped)
    return get_wds_train_data(args, PILToTensor(), CaptionBuilder(CLASSNAMES, descriptors=["{} at night."]), tokenizer=TOKENIZER)


# -- item 9: every dropped sample counts, once ------------------------------------------------------

def test_unreadable_images_count_once_toward_the_skipped_share(tmp_path):
    # 32 of 64 JPEGs truncated: the run trained on, "samples read 64 … unreadable 64", and the share was never checked
    (shard,) = write_shards(str(tmp_path), jpeg_samples(64, truncated=set(range(0, 64, 2))), samples_per_shard=64)
    data = wds_data(shard, batch_size=16, num_samples=64)
    data.set_epoch(0)
    batches = len(list(data.dataloader))  # the epoch needs two passes over the shard: the second is not counted
    stats = data.label_stats
    assert batches == 4 and stats.seen.value == 64 and stats.undecodable.value == 32 and stats.skipped == 32
    assert "skipped 32 (" in stats.summary() and "32 with an unreadable image" in stats.summary()
    with pytest.raises(StarftError) as e:
        stats.check(0.01, len(CLASSNAMES), repr(shard), final=True)
    message = str(e.value)
    assert "\n" not in message and "32 of 64 samples" in message and "--starft-max-skipped-fraction" in message
    stats.check(0.5, len(CLASSNAMES), repr(shard), final=True)  # exactly half: at the limit, not over it


def test_the_skipped_share_is_decided_early_for_unreadable_images_too(tmp_path):
    # the check before the epoch's end stops a run certain to end over the limit, whatever the cause
    (shard,) = write_shards(str(tmp_path), jpeg_samples(64, truncated=set(range(0, 64, 2))), samples_per_shard=64)
    data = wds_data(shard, batch_size=4, num_samples=32)
    data.set_epoch(0)
    with pytest.raises(StarftError, match="were skipped"):
        for _ in data.dataloader:
            data.label_stats.check(0.01, len(CLASSNAMES), "x")


class _Pass:
    pass_index = 0


def test_out_of_range_labels_are_counted_as_every_skipped_sample_is():
    # issue 26: the stage counted out-of-range ids directly, in every pass, beside the counter's rule
    from open_clip_starft.data.training import _LabelledSamples
    position = _Pass()
    stats = LabelStats(position)
    stage = _LabelledSamples(stats, num_classes=2)
    batch = [{"__key__": "a", "jpg": b"x", "cls": b"1"}, {"__key__": "b", "jpg": b"x", "cls": b"3"},
             {"__key__": "c", "cls": b"0"}, {"__key__": "d", "jpg": b"x"}]
    for index in (0, 1, 2):  # three passes over the same samples: counted once
        position.pass_index = index
        assert [s["__key__"] for s in stage(iter(batch))] == ["a"]
    assert (stats.seen.value, stats.kept.value, stats.skipped) == (4, 1, 3)
    assert (stats.out_of_range.value, stats.no_image.value, stats.no_label.value, stats.bad_id.value) == (1, 1, 1, 3)


# -- the entry point: nothing written before the flags are checked; a refused run leaves nothing -------

@pytest.fixture(scope="module")
def ws(small_data, tmp_path_factory):
    """conftest's ``small_data`` (64 samples in 2 shards, the tiny model) with a validation set; runs under a
    folder of this module's."""
    root = tmp_path_factory.mktemp("relhost")
    ws = workspace(small_data, root)
    ws["val"] = brace_pattern(demo_shards(str(root / "val"), 32, seed=21, biased=False, image_size=32,
                                          samples_per_shard=32))
    return ws


def logs(ws, *name):
    return os.path.join(ws["root"], "logs", *name)


def refused(argv, *needles):
    """The entry point (in this process) refused ``argv`` with status 2 in one line holding every needle."""
    return one_line_error(run(argv), *needles, status=2)


def test_a_refused_flag_leaves_nothing_behind(ws):
    # item 13: --starft-val-frequency 0 was refused after out.log was written, and the corrected rerun then
    # got upstream's "Experiment already exists. Use --name {}"
    refused(train_args(ws, "freq0", "--starft-val", f"val={ws['val']}", "--starft-val-frequency", "0"),
            "--starft-val-frequency", "≥ 1")
    assert not os.path.exists(logs(ws, "freq0"))


def test_a_run_refused_after_upstream_wrote_its_log_leaves_no_folder(ws):
    # the class: a check that needs the model (a --starft-val set) refuses after upstream made LOGS/NAME and
    # out.log; the folder this run created goes, the logs folder and the other runs in it stay
    os.makedirs(logs(ws, "someone-else"), exist_ok=True)
    refused(train_args(ws, "late", "--starft-val", f"val={ws['root']}/missing", epochs=1), "does not exist")
    assert not os.path.exists(logs(ws, "late")) and os.path.isdir(logs(ws, "someone-else"))


def test_a_missing_reporter_package_is_named_before_anything_is_written(ws, monkeypatch):
    # item 11: upstream asserted "Please install wandb." after building the model and data, and the name was taken
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "tensorboard")
                        else real(name, *a))
    for report_to, package in (("wandb", "wandb"), ("tensorboard", "tensorboard"), ("all", "wandb and tensorboard")):
        refused(train_args(ws, "report", "--report-to", report_to, epochs=1),
                f"--report-to {report_to}", f"needs the {package} package", "pip install")
        assert not os.path.exists(logs(ws, "report"))
    monkeypatch.undo()
    refused(train_args(ws, "report", "--report-to", "tensorbord", epochs=1), "unknown reporter 'tensorbord'")
    assert not os.path.exists(logs(ws, "report"))


def test_the_default_install_gives_every_reporter_the_docs_use():
    # item 11: README's `pip install -e .` did not install tensorboard, which its own example reports to
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        dependencies = {re.split(r"[\[<>=!~; ]", d)[0].lower() for d in tomllib.load(f)["project"]["dependencies"]}
    used = set()
    for path in [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md"))]:
        with open(path, encoding="utf-8") as f:
            fenced = False
            for line in f:  # example commands: indented code blocks and fenced ones
                fenced ^= line.lstrip().startswith("```")
                if fenced or line.startswith("    "):
                    for value in re.findall(r"--report-to[ =]([a-z,]+)", line):
                        used.update(value.split(","))
    assert "tensorboard" in used  # the check below checks something
    package = {"wandb": "wandb", "tensorboard": "tensorboard"}  # what upstream imports for each reporter
    packages = {p for n in used for p in (package.values() if n == "all" else [package[n]])}
    assert packages <= dependencies, packages - dependencies


@pytest.mark.parametrize("num_samples", [None, "64"])
def test_a_pattern_with_missing_shards_is_one_line_before_the_model(ws, num_samples):
    # item 10: 2 of 4 shards absent ended in upstream's KeyError, or with --train-num-samples trained on the rest
    pattern = ws["data"].replace("{000000..000001}", "{000000..000003}")
    assert pattern != ws["data"]
    name = f"missing-{num_samples}"
    args = train_args(ws, name, *(["--train-num-samples", num_samples] if num_samples else []), epochs=1)
    args[args.index("--train-data") + 1] = pattern
    refused(args, "2 of 4 shards of --train-data", "shard-000002.tar", "do not exist")
    assert not os.path.exists(logs(ws, name))


def test_upstreams_frozen_batchnorm_with_a_batch_teacher_is_refused_like_ours(ws):
    # item 4: --lock-image-freeze-bn-stats with --starft-teacher-batchnorm batch ran (Star term 0.80 at step 0)
    for flags in (["--lock-image", "--lock-image-freeze-bn-stats"], ["--starft-freeze-bn-stats"]):
        refused(train_args(ws, "bn", *flags, "--starft-teacher-batchnorm", "batch", epochs=1),
                f"{flags[-1]} keeps the student on running statistics", "drop --starft-teacher-batchnorm batch")
        assert not os.path.exists(logs(ws, "bn"))


def test_the_memory_layout_is_no_setting_of_a_resumed_run():
    # also seen: dropping --starft-channels-last on resume was refused as a changed setting
    args = SimpleNamespace(batch_size=4, world_size=1, accum_freq=1, epochs=2)
    entries = []
    for layout in (True, False):
        starft, _ = build_parser().parse_known_args(["--starft-channels-last"] if layout else [])
        entries.append(RunState(settings=starft_settings(starft)).history_entry(args, 1))
    assert changes(entries[0], entries[1], mid_epoch=False) == []
    entries[1]["settings"]["starft_lambda"] = 0.25  # another setting is still a change
    assert changes(entries[0], entries[1], mid_epoch=False) == ["--starft-lambda 0.5 → 0.25"]


# -- a finished run: killed while writing best.pt, resumed, finished, best.pt passed to --resume ---------

@pytest.fixture(scope="module")
def finished_run(ws):
    """A 2-epoch run with --starft-val and --starft-select (best.pt) in channels-last layout, then killed as if
    while writing best.pt after epoch 2: epoch_2.pt never written, results.jsonl already holding epoch 2, the
    temporary best.pt.partial-PID of the dead process left behind."""
    name = "finished"
    val = ["--starft-val", f"val={ws['val']}", "--starft-select", "val:top1"]
    done = run(train_args(ws, name, *val, "--starft-channels-last", epochs=2))
    assert done.returncode == 0, done.stderr[-3000:]
    folder = logs(ws, name, "checkpoints")
    os.remove(os.path.join(folder, "epoch_2.pt"))
    with open(os.path.join(folder, "best.pt.partial-99999999"), "wb") as f:
        f.write(b"PK\x03\x04 cut short")
    before = results_lines(folder)
    assert [(r["epoch"], r["set"]) for r in before] == [(0, "val"), (1, "val"), (2, "val")]
    again = run(train_args(ws, name, *val, "--resume", "latest", epochs=2))  # without --starft-channels-last
    return {"name": name, "folder": folder, "val": val, "resumed": again}


def results_lines(folder):
    with open(os.path.join(folder, "results.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_run_killed_while_writing_best_pt_resumes_clean(finished_run):
    # also seen: the .partial stayed for good and results.jsonl held two lines for epoch 2
    again, folder = finished_run["resumed"], finished_run["folder"]
    assert again.returncode == 0, again.stderr[-3000:]
    assert [(r["epoch"], r["set"]) for r in results_lines(folder)] == [(0, "val"), (1, "val"), (2, "val")]
    assert not [n for n in os.listdir(folder) if ".partial" in n]
    assert "epoch_2.pt" in os.listdir(folder)


def test_resume_latest_on_a_finished_run_says_nothing_is_left(ws, finished_run):
    # item 20: exit 0 in 7 s without a word
    out_log = logs(ws, finished_run["name"], "out.log")
    size = os.path.getsize(out_log)
    done = run(train_args(ws, finished_run["name"], *finished_run["val"], "--resume", "latest", epochs=2))
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stderr
    assert "nothing is left to train" in said and "--epochs above 2" in said and "epoch_2.pt" in said
    assert os.path.getsize(out_log) == size  # nothing started, nothing written
    epoch_2 = os.path.join(finished_run["folder"], "epoch_2.pt")  # the file named, under a new name
    done = run(train_args(ws, "from-finished", *finished_run["val"], "--resume", epoch_2, epochs=2))
    assert done.returncode == 0 and f"nothing is left to train: {epoch_2}" in done.stderr, done.stderr[-3000:]
    assert not os.path.exists(logs(ws, "from-finished"))


def test_best_pt_as_resume_says_it_holds_weights_only(ws, finished_run):
    # item 12: --resume …/best.pt ended in KeyError: 'optimizer'
    best = os.path.join(finished_run["folder"], "best.pt")
    for name in ("from-best", finished_run["name"]):
        # the run's own settings and a changed --epochs allowed: what is left is the missing optimizer state
        refused(train_args(ws, name, "--resume", best, "--starft-channels-last", "--starft-allow-changed-settings",
                                   *finished_run["val"], epochs=3), f"--resume {best} holds weights only",
                "--epochs best", f"export --checkpoint {best}")
    assert not os.path.exists(logs(ws, "from-best"))
    with pytest.raises(DataError, match="holds weights only"):  # the reader itself, for callers past the entry point
        load_resume(lambda path, map_location: torch.load(path, map_location=map_location, weights_only=True), best)


def test_a_new_run_on_a_taken_name_is_one_line(ws, finished_run):
    # item 13: upstream's "Error. Experiment already exists. Use --name {} …" (a literal {}), exit 1
    refused(train_args(ws, finished_run["name"], epochs=1), f"the run folder {logs(ws, finished_run['name'])}",
            "pass a new --name", "--resume latest")
