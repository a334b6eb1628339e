"""The training data pipeline on data each test makes itself: 16-bit images, truncated and empty
tars, unlabelled samples, the pre-scan, the shard/reader check and step-exact resume (issue 13)."""
import io
import logging
import os
import sys
import tarfile
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import PILToTensor

from open_clip_starft.data.samples import brace_pattern, write_shards
from open_clip_starft.data.checks import LabelStats, prescan_shards
from open_clip_starft.data.training import get_wds_train_data
from open_clip_starft.demo.data import CLASSNAMES, render_sample
from open_clip_starft.errors import StarftError
from open_clip_starft.method.captions import CaptionBuilder

TOKENIZER = open_clip.get_tokenizer("ViT-B-32")
DESCRIPTORS = ["{} at night.", "{} in the rain.", "{} on a road.", "{} in fog."]


def jpeg(i, size=16):
    image, cls, _ = render_sample(i, seed=1, image_size=size)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), cls


def samples(n, *, start=0, without_cls=(), empty_image=()):
    for i in range(start, start + n):
        data, cls = jpeg(i)
        sample = {"__key__": f"s{i:05d}", "jpg": b"" if i in empty_image else data}
        if i not in without_cls:
            sample["cls"] = cls
        yield sample


def args_for(pattern, *, workers=0, batch_size=4, world_size=1, max_skipped=0.01, num_samples=None):
    return SimpleNamespace(train_data=pattern, train_num_samples=num_samples, dataset_resampled=False,
                           train_data_upsampling_factors=None, workers=workers, world_size=world_size, seed=3,
                           rank=0, batch_size=batch_size, starft_max_skipped_fraction=max_skipped)


def pipeline(args, *, with_ids=True):
    """The training data; with ``with_ids`` batches carry the sample ids (shard/key) as their 6th entry."""
    builder = CaptionBuilder(CLASSNAMES, descriptors=DESCRIPTORS)
    return get_wds_train_data(args, PILToTensor(), builder, tokenizer=TOKENIZER,
                              preprocess_plain=(lambda image: torch.zeros(1, 1, 1)) if with_ids else None)


def epoch_batches(data, epoch):
    data.set_epoch(epoch)
    return [([i.rsplit("/", 1)[1] for i in batch[5]], batch[2].tolist(), batch[3].tolist()) for batch in data.dataloader]


# -- 16-bit images ------------------------------------------------------------------------------

def sixteen_bit_png(value16: int) -> bytes:
    image = Image.fromarray(np.full((16, 16), value16, dtype=np.uint16))
    assert image.mode == "I;16"
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_a_16_bit_png_trains_as_its_8_bit_grey_not_white(tmp_path):
    # issue 13 case 2: wds.decode("pilrgb") made every I;16 image solid white (255)
    value = 40000  # 40000 / 257 = 155.6 → 156
    paths = write_shards(str(tmp_path), ({"__key__": f"p{i}", "png": sixteen_bit_png(value), "cls": i % 4} for i in range(8)),
                         samples_per_shard=8)
    data = pipeline(args_for(brace_pattern(paths), batch_size=8), with_ids=False)
    (batch,) = list(data.dataloader)
    images = batch[0]
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.uint8
    assert int(images.min()) == int(images.max()) == 156


# -- truncated and empty tars ---------------------------------------------------------------------

def test_a_tar_cut_inside_a_header_is_counted_and_named(tmp_path, caplog):
    # issue 13 case 3: tarfile stops quietly at a header cut, 8 of 16 samples came out, counters said 0
    good = write_shards(str(tmp_path / "good"), samples(16), samples_per_shard=16)[0]
    with tarfile.open(good) as tar:
        members = tar.getmembers()
    raw = open(good, "rb").read()
    cut = members[17].offset + 100  # 45 % of the members in, inside a header
    folder = tmp_path / "cut"
    folder.mkdir()
    shard = str(folder / "shard-000000.tar")
    with open(shard, "wb") as f:
        f.write(raw[:cut])
    data = pipeline(args_for(shard, batch_size=1, num_samples=8))
    with caplog.at_level(logging.WARNING):
        keys = {key for batch in epoch_batches(data, 0) for key in batch[0]}
    assert keys == {f"s{i:05d}" for i in range(8)}  # the samples before the cut, never the half one at it
    stats = data.label_stats
    assert stats.broken_shards.value >= 1 and "unreadable shard read(s)" in stats.summary()
    assert shard in stats.summary()
    named = [r.getMessage() for r in caplog.records if shard in r.getMessage()]
    assert any("pre-scan" in m and "truncated" in m for m in named), named
    assert any(m.startswith("Skipping unreadable training data") and "truncated" in m for m in named), named


def test_an_empty_tar_is_named_in_the_log(tmp_path, caplog):
    write_shards(str(tmp_path), samples(8), samples_per_shard=8)
    empty = str(tmp_path / "shard-000001.tar")
    with tarfile.open(empty, "w"):
        pass
    with caplog.at_level(logging.WARNING):
        data = pipeline(args_for(os.path.join(str(tmp_path), "shard-{000000..000001}.tar"), batch_size=4,
                                 num_samples=8), with_ids=False)
        assert len(list(data.dataloader)) == 2
    assert any(empty in r.getMessage() and "empty tar" in r.getMessage() for r in caplog.records)


def test_a_zero_byte_image_is_named_with_its_shard_and_key(tmp_path, caplog):
    paths = write_shards(str(tmp_path), samples(8, empty_image={5}), samples_per_shard=8)
    data = pipeline(args_for(paths[0], batch_size=7, num_samples=7), with_ids=False)
    with caplog.at_level(logging.WARNING):
        assert len(list(data.dataloader)) == 1
    message = next(r.getMessage() for r in caplog.records if "0 bytes" in r.getMessage())
    assert "'s00005'" in message and paths[0] in message
    assert data.label_stats.undecodable.value == data.label_stats.skipped == 1


# -- unlabelled samples: the pre-scan and the skipped-share check -------------------------------

def test_prescan_names_a_sample_without_cls_before_the_first_step(tmp_path):
    # issue 13 case 7: 1 of 32 without 'cls' stopped the run only after the whole epoch
    paths = write_shards(str(tmp_path), samples(32, without_cls={20}), samples_per_shard=8)
    with pytest.raises(StarftError) as e:
        pipeline(args_for(brace_pattern(paths)))
    message = str(e.value)
    assert "\n" not in message and "1 of 32" in message and "'s00020'" in message
    assert "shard-000002.tar" in message and "--starft-max-skipped-fraction" in message
    # under a threshold it passes, and the shard is named in a warning
    assert prescan_shards(paths, 4, 0.05, "x")["skipped"] == 1


def test_prescan_blames_a_broken_shard_not_labels(tmp_path, caplog):
    paths = write_shards(str(tmp_path), samples(32), samples_per_shard=8)
    raw = open(paths[1], "rb").read()
    with open(paths[1], "wb") as f:
        f.write(raw[:len(raw) // 3])
    with caplog.at_level(logging.WARNING):
        counts = prescan_shards(paths, 4, 0.01, "x")
    assert counts["broken"] == 1 and counts["skipped"] == 0 and counts["all"]
    (message,) = [r.getMessage() for r in caplog.records]
    assert paths[1] in message and "broken" in message and "'cls'" not in message
    # training: the half sample at the cut is not counted as one without 'cls'; the shard is named
    data = pipeline(args_for(brace_pattern(paths), num_samples=24))
    assert len(epoch_batches(data, 0)) == 6
    data.label_stats.check(0.01, 4, "x", final=True)
    assert data.label_stats.no_label.value == 0 and paths[1] in data.label_stats.summary()
    # every shard broken: one line that says so, not that labels are missing
    with open(paths[0], "wb") as f:
        f.write(raw[:700])
    with pytest.raises(StarftError, match="no shard can be read") as e:
        prescan_shards(paths[:1], 4, 0.01, "x")
    assert "'cls'" not in str(e.value) and paths[0] in str(e.value)


def test_prescan_refuses_a_class_id_beyond_the_names(tmp_path):
    paths = write_shards(str(tmp_path), samples(8), samples_per_shard=8)
    with pytest.raises(StarftError, match="outside the 2 class names"):
        prescan_shards(paths, 2, 0.01, "x")


def test_one_unlabelled_sample_in_128_early_never_stops_the_run(tmp_path):
    # issue 13 case 6: the check decided after 50 samples, so 1 in 128 (0.78 % < 1 %) stopped the run
    stats = LabelStats()
    stats.start_epoch(128)
    stats.add(stats.seen, 50)
    stats.add(stats.kept, 49)
    stats.add(stats.no_label)
    stats.check(0.01, 4, "x")  # 1 / (50 + 79 to come) < 1 %: cannot be over at the end
    # through the pipeline: the sample the shuffle gives first has no 'cls'; checked after every
    # batch as the step does (the order of positions does not depend on the labels)
    labelled = write_shards(str(tmp_path / "a"), samples(128), samples_per_shard=32)
    order = [key for batch in epoch_batches(pipeline(args_for(brace_pattern(labelled))), 0) for key in batch[0]]
    first = int(order[0][1:])
    paths = write_shards(str(tmp_path / "b"), samples(128, without_cls={first}), samples_per_shard=32)
    data = pipeline(args_for(brace_pattern(paths), batch_size=4), with_ids=False)  # sizes.json: an epoch of 128
    data.set_epoch(0)
    no_label_after = []
    for _ in data.dataloader:
        data.label_stats.check(0.01, 4, "x")
        no_label_after.append(data.label_stats.no_label.value)
    data.label_stats.check(0.01, 4, "x", final=True)
    assert no_label_after[0] == 1  # read first: the old rule (decide after 50 samples) stopped this run
    assert data.label_stats.no_label.value == 1 and data.label_stats.seen.value == 128  # a second pass is not recounted


def test_a_share_certain_to_be_over_stops_early(tmp_path):
    # the other side: 25 % unlabelled stops long before the epoch ends
    paths = write_shards(str(tmp_path), samples(512, without_cls=set(range(0, 512, 4))), samples_per_shard=128)
    data = pipeline(args_for(brace_pattern(paths), batch_size=4, max_skipped=1.0, num_samples=384), with_ids=False)
    data.set_epoch(0)
    batches = 0
    with pytest.raises(StarftError, match="were skipped"):
        for _ in data.dataloader:
            batches += 1
            data.label_stats.check(0.01, 4, "x")
    assert batches < data.dataloader.num_batches // 2


# -- shards per reader ----------------------------------------------------------------------------

def test_workers_0_counts_as_one_reader_per_process(tmp_path):
    # issue 13 case 8: one shard, 2 processes, --workers 0 passed the check (1 < 0 × 2 is false)
    paths = write_shards(str(tmp_path), samples(16), samples_per_shard=16)
    with pytest.raises(StarftError) as e:
        pipeline(args_for(paths[0], workers=0, world_size=2))
    assert "\n" not in str(e.value) and "1 shard(s) for 1 reader(s) × 2 process(es)" in str(e.value)
    pipeline(args_for(paths[0], workers=0, world_size=1))  # one reader, one shard: fine


# -- step-exact resume ------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2])
def test_start_from_continues_the_uninterrupted_epoch_exactly(tmp_path, workers):
    # issue 13 case 9: a resumed epoch re-read its data from the start
    paths = write_shards(str(tmp_path), samples(75), samples_per_shard=15)  # 5 shards: uneven per worker
    pattern = brace_pattern(paths)
    full = epoch_batches(pipeline(args_for(pattern, workers=workers)), 2)
    assert len(full) == (20 if workers == 2 else 19)
    keys = [k for batch in full for k in batch[0]]
    assert len(set(keys)) >= 60  # most samples; a worker whose shards run out repeats them (a second pass)
    assert full == epoch_batches(pipeline(args_for(pattern, workers=workers)), 2)  # the order repeats
    assert full != epoch_batches(pipeline(args_for(pattern, workers=workers)), 3)  # and changes by epoch
    for k in (1, 2, 5, 13, len(full) - 1):  # 13: a worker resumes inside its second pass
        data = pipeline(args_for(pattern, workers=workers))
        data.start_from(2, k)
        assert epoch_batches(data, 2) == full[k:], k  # keys, spurious captions and labels
        assert epoch_batches(data, 3) == epoch_batches(pipeline(args_for(pattern, workers=workers)), 3)


def test_start_from_with_resampled_shards(tmp_path):
    paths = write_shards(str(tmp_path), samples(60), samples_per_shard=10)

    def data():
        args = args_for(brace_pattern(paths), workers=2)
        args.dataset_resampled = True
        return pipeline(args)
    full = epoch_batches(data(), 1)
    assert full == epoch_batches(data(), 1)  # the shard draws no longer depend on torch's RNG state
    for k in (3, len(full) - 1):
        resumed = data()
        resumed.start_from(1, k)
        assert epoch_batches(resumed, 1) == full[k:]


# -- end to end: the entry point stops before the first step, with one line --------------------

@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from runs import make_workspace
    return make_workspace(tmp_path_factory.mktemp("data-e2e"), n=32, shards=1)


def last_line_error(result, *needles):
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("open-clip-starft: error: "), result.stderr[-3000:]
    for needle in needles:
        assert needle in last, last
    return last


def test_a_sample_without_cls_stops_the_run_before_its_first_step(ws, tmp_path):
    from runs import run, train_args
    paths = write_shards(str(tmp_path / "shards"), samples(32, without_cls={9}), samples_per_shard=8)
    args = train_args(ws, "prescan", epochs=1, batch_size=8)
    args[args.index("--train-data") + 1] = brace_pattern(paths)
    result = run(args)
    last_line_error(result, "1 of 32", "'s00009'", "shard-000001.tar", "--starft-max-skipped-fraction")
    assert "Train Epoch" not in result.stdout + result.stderr  # not after an epoch: before any step


@pytest.mark.e2e
def test_two_processes_with_workers_0_and_one_shard_stop_with_one_line(ws):
    from runs import run, train_args
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29647",
                "-m", "--", "open_clip_starft.main")
    result = run(train_args(ws, "one-shard", epochs=1, batch_size=8, workers=0), launcher=launcher)
    assert result.returncode != 0 and "Connection closed by peer" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("open-clip-starft: error: ")]
    assert len(errors) == 2 and all("1 shard(s) for 1 reader(s) × 2 process(es)" in e for e in errors), result.stderr[-3000:]
    assert "open_clip_starft/" not in result.stderr  # no traceback of ours (torchrun reports the exits with its own)
    assert "exitcode  : 2" in result.stderr


@pytest.mark.parametrize("workers", [0, 2])
def test_start_from_continues_a_csv_epoch_exactly(tmp_path, workers):
    from open_clip_starft.data.training import get_csv_train_data
    from open_clip_starft.demo.data import write_csv

    path = write_csv(str(tmp_path), 30, seed=2, image_size=16)

    def data():
        args = SimpleNamespace(train_data=path, csv_img_key="filepath", starft_csv_label_key="label", csv_separator="\t",
                               seed=3, rank=0, world_size=1, batch_size=4, workers=workers, starft_max_skipped_fraction=0.01)
        return get_csv_train_data(args, PILToTensor(), CaptionBuilder(CLASSNAMES, descriptors=DESCRIPTORS),
                                  tokenizer=TOKENIZER, preprocess_plain=lambda image: torch.zeros(1, 1, 1))
    full = epoch_batches(data(), 1)
    assert len(full) == 7 and full == epoch_batches(data(), 1) and full != epoch_batches(data(), 2)
    for k in (1, 4, 6):
        resumed = data()
        resumed.start_from(1, k)
        assert epoch_batches(resumed, 1) == full[k:]
        assert epoch_batches(resumed, 2) == epoch_batches(data(), 2)  # only the resumed epoch is shortened
