"""Issue 28, the training side: bad input to the training entry point, each case on data the test makes
itself. Every dropped sample counts (item 9); nothing is written before the flags, the data pattern and the
reporters are checked, and a refused run leaves nothing behind (10, 11, 13); ``best.pt`` is no ``--resume``
file (12); a finished run says so (20); a killed ``best.pt`` write is cleaned up on resume; the memory
layout is no setting."""
import io
from types import SimpleNamespace

import open_clip
import pytest
from torchvision.transforms import PILToTensor

from open_clip_starft.data.checks import LabelStats
from open_clip_starft.data.samples import write_shards
from open_clip_starft.data.training import get_wds_train_data
from open_clip_starft.demo.data import CLASSNAMES, render_sample
from open_clip_starft.errors import StarftError
from open_clip_starft.method.captions import CaptionBuilder

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
