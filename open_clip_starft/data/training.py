"""Training data for StarFT: class-labelled images → (image, caption, spurious caption, label).

Webdataset shards hold an image (``jpg``/``jpeg``/``png``/``webp``) and an integer class id
(``cls``) per sample. The pipeline is upstream's (``open_clip_train.data``): its shard lists,
resampling, deterministic shard shuffle, node/worker splitting, error-tolerant tar reading and
sample shuffle; only the tail differs: a label check, captions made per sample on the fly, and
batches of ``(images [B,3,H,W], texts [B,L], spurious [B,L], labels [B])``.
A CSV (``--dataset-type csv``) gives image paths and labels instead.

Samples without a usable label are skipped and counted (``LabelStats``); the training loop logs
the counts and stops with a clear error when the skipped share passes
``--starft-max-skipped-fraction`` or a class id is outside the class names.
"""
from __future__ import annotations

import logging
import math
import os
import random
from multiprocessing import Value

import pandas as pd
import torch
import webdataset as wds
from open_clip_train.data import (
    DataInfo, ResampledShards2, SharedEpoch, _SAMPLE_SHUFFLE_INITIAL, _SAMPLE_SHUFFLE_SIZE,
    _SHARD_SHUFFLE_INITIAL, _SHARD_SHUFFLE_SIZE, detshuffle2, expand_urls, get_dataset_size,
    tarfile_to_samples_nothrow,
)
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torch.utils.data.distributed import DistributedSampler

from open_clip_starft.data.samples import IMAGE_KEYS, parse_label
from open_clip_starft.method.captions import CaptionBuilder
from open_clip_starft.errors import StarftError

_MIN_SEEN_FOR_CHECK = 50  # the skipped share is judged once this many samples were read


class LabelStats:
    """Counts shared with data-loader workers (multiprocessing values, like upstream's SharedEpoch)."""

    def __init__(self):
        self.seen = Value("l", 0)
        self.no_label = Value("l", 0)
        self.no_image = Value("l", 0)
        self.out_of_range = Value("l", 0)
        self.bad_id = Value("l", 0)
        self.read_errors = Value("l", 0)

    def add(self, counter, amount=1):
        with counter.get_lock():
            counter.value += amount

    def summary(self) -> str:
        return (f"so far: samples read {self.seen.value}, skipped without a usable 'cls' label {self.no_label.value}, "
                f"without an image {self.no_image.value}, unreadable shards/samples {self.read_errors.value}")

    def check(self, max_skipped_fraction: float, num_classes: int, source: str, final: bool = False):
        """Raise StarftError when a class id was out of range or too many samples were skipped."""
        if self.out_of_range.value:
            raise StarftError(
                f"{self.out_of_range.value} sample(s) in {source} have class ids outside the {num_classes} class names "
                f"(e.g. {self.bad_id.value}): pass --starft-classnames with a file that names every class id")
        seen, skipped = self.seen.value, self.no_label.value + self.no_image.value
        if seen and (final or seen >= _MIN_SEEN_FOR_CHECK) and skipped / seen > max_skipped_fraction:
            raise StarftError(
                f"{skipped} of {seen} samples in {source} were skipped ({self.summary()}): every sample needs an "
                f"image and an integer class id under the key 'cls' (or raise --starft-max-skipped-fraction, now {max_skipped_fraction})")


def caption_rng(seed: int, rank: int, epoch: int) -> random.Random:
    """A caption RNG for this data-loader worker, reproducible from the run's seed, rank and epoch."""
    info = get_worker_info()
    worker = info.id if info is not None else 0
    return random.Random(hash((seed, rank, worker, epoch)) & 0xFFFFFFFF)


class _LabelledSamples:
    """Pipeline stage: keep samples with an image and a usable in-range ``cls``; count the rest."""

    def __init__(self, stats: LabelStats, num_classes: int):
        self.stats, self.num_classes = stats, num_classes

    def __call__(self, samples):
        for sample in samples:
            self.stats.add(self.stats.seen)
            if not any(k in sample for k in IMAGE_KEYS):
                self.stats.add(self.stats.no_image)
                continue
            label = parse_label(sample.get("cls"))
            if label is None:
                self.stats.add(self.stats.no_label)
                continue
            if not 0 <= label < self.num_classes:
                self.stats.add(self.stats.out_of_range)
                self.stats.bad_id.value = label
                continue
            sample["__label__"] = label  # a "__" key: wds.decode leaves it alone
            yield sample


class _AddCaptions:
    """Pipeline stage: a clean and a spurious caption per sample, from a per-worker seeded RNG."""

    def __init__(self, builder: CaptionBuilder, seed: int, rank: int, epoch: SharedEpoch):
        self.builder, self.seed, self.rank, self.epoch = builder, seed, rank, epoch

    def __call__(self, samples):
        rng = caption_rng(self.seed, self.rank, self.epoch.get_value())
        for sample in samples:
            sample["text"], sample["spurious"] = self.builder(sample["__label__"], rng)
            yield sample


class _AddPlainImage:
    """Pipeline stage (``--starft-teacher-image-cache``): the un-augmented image (eval transform)
    and a sample id (shard URL + key), for the teacher's per-image feature cache."""

    def __init__(self, preprocess_plain):
        self.preprocess_plain = preprocess_plain

    def __call__(self, samples):
        for sample in samples:
            sample["plain"] = self.preprocess_plain(sample["image"])
            sample["__sample_id__"] = f"{sample.get('__url__', '')}/{sample['__key__']}"
            yield sample


class Collate:
    """``[(image, text, spurious, label[, plain image, sample id])]`` → ``(images [B,3,H,W],
    texts [B,L], spurious [B,L], labels [B][, plain images [B,3,H,W], ids [B]])``; captions are
    tokenized per batch."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, samples):
        images, texts, spurious, labels, *plain = zip(*samples)
        batch = (torch.stack(images), self.tokenizer(list(texts)), self.tokenizer(list(spurious)),
                 torch.tensor(labels, dtype=torch.long))
        if plain:
            batch += (torch.stack(plain[0]), list(plain[1]))
        return batch


def _counting_handler(stats: LabelStats):
    def handler(exn):
        stats.add(stats.read_errors)
        logging.warning(f"Skipping unreadable training data ({exn!r}).")
        return True
    return handler


def check_shards_exist(pattern: str) -> list[str]:
    """The local shard files of ``pattern``; a StarftError when none exists (remote URLs pass)."""
    urls, _ = expand_urls(pattern)
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.exists(u)]
    if local and len(missing) == len(local):
        raise StarftError(f"--train-data {pattern!r} matches no file (first: {missing[0]!r}): "
                          "check the path and the brace pattern, e.g. 'shards/train-{0000..0099}.tar'")
    if missing:
        logging.warning(f"{len(missing)} of {len(local)} shards of --train-data do not exist, e.g. {missing[0]}")
    return urls


class _StopWhenEmpty(wds.DataPipeline):
    """``with_epoch`` repeats the data without end; stop when a whole pass yields nothing (no
    labelled sample), where webdataset would spin forever."""

    def iterator(self):
        for _ in range(self.repetitions):
            empty = True
            for item in self.iterator1():
                empty = False
                yield item
            if empty:
                return


def get_wds_train_data(args, preprocess_img, builder: CaptionBuilder, epoch: int = 0, tokenizer=None,
                       preprocess_plain=None) -> DataInfo:
    """Upstream's training shard pipeline with StarFT's labelled tail (see the module docstring).
    With ``preprocess_plain`` each sample also carries its un-augmented image and an id."""
    pattern = args.train_data
    urls = check_shards_exist(pattern)
    resampled = getattr(args, "dataset_resampled", False)
    if args.train_num_samples is not None:
        num_samples, num_shards = args.train_num_samples, None
    else:
        num_samples, num_shards = get_dataset_size(pattern)
        if not num_samples:
            raise StarftError(f"--train-data {pattern!r} has no sizes.json or __len__ beside its shards: "
                              "pass --train-num-samples N")
    shared_epoch = SharedEpoch(epoch=epoch)
    stats = LabelStats()
    handler = _counting_handler(stats)
    if args.train_data_upsampling_factors is not None and not resampled:
        raise StarftError("--train-data-upsampling-factors needs --dataset-resampled")

    if resampled:
        pipeline = [ResampledShards2(pattern, weights=args.train_data_upsampling_factors,
                                     deterministic=True, epoch=shared_epoch)]
    else:
        num_shards = num_shards or len(urls)
        if num_shards < args.workers * args.world_size:
            raise StarftError(f"--train-data has {num_shards} shards for {args.workers} workers × {args.world_size} "
                              "processes: use fewer --workers or more shards (each worker needs one)")
        pipeline = [
            wds.SimpleShardList(pattern),
            detshuffle2(bufsize=_SHARD_SHUFFLE_SIZE, initial=_SHARD_SHUFFLE_INITIAL, seed=args.seed, epoch=shared_epoch),
            wds.split_by_node,
            wds.split_by_worker,
        ]
    pipeline.extend([
        lambda src: tarfile_to_samples_nothrow(src, handler=handler),
        wds.shuffle(bufsize=_SAMPLE_SHUFFLE_SIZE, initial=_SAMPLE_SHUFFLE_INITIAL),
        _LabelledSamples(stats, builder.num_classes),
        wds.decode("pilrgb", handler=handler),
        wds.rename(image=";".join(IMAGE_KEYS)),
        _AddCaptions(builder, args.seed, args.rank, shared_epoch),
        *([_AddPlainImage(preprocess_plain)] if preprocess_plain else []),
        wds.map_dict(image=preprocess_img, handler=handler),
        wds.to_tuple("image", "text", "spurious", "__label__", *(("plain", "__sample_id__") if preprocess_plain else ())),
        wds.batched(args.batch_size, collation_fn=Collate(tokenizer), partial=False),
    ])
    dataset = _StopWhenEmpty(*pipeline)

    # As upstream: every worker yields the same number of full batches, so all ranks step together.
    global_batch_size = args.batch_size * args.world_size
    num_workers = max(1, args.workers)
    num_worker_batches = math.ceil(math.ceil(num_samples / global_batch_size) / num_workers)
    num_batches = num_worker_batches * num_workers
    dataset = dataset.with_epoch(num_worker_batches)
    dataloader = wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=args.workers,
                               persistent_workers=args.workers > 0)
    dataloader.num_batches = num_batches
    dataloader.num_samples = num_batches * global_batch_size
    info = DataInfo(dataloader=dataloader, shared_epoch=shared_epoch)
    info.label_stats = stats
    return info


class LabelledCsvDataset(Dataset):
    """Rows of a CSV/TSV with an image path and an integer class id; captions per sample and epoch."""

    def __init__(self, path, transforms, builder: CaptionBuilder, tokenizer, img_key, label_key, sep, seed, stats,
                 preprocess_plain=None):
        try:
            df = pd.read_csv(path, sep=sep)
        except FileNotFoundError:
            raise StarftError(f"--train-data {path!r} not found: check the CSV path") from None
        for key, flag in ((img_key, "--csv-img-key"), (label_key, "--starft-csv-label-key")):
            if key not in df.columns:
                raise StarftError(f"--train-data {path!r} has no column {key!r} (columns: {', '.join(map(str, df.columns))}): "
                                  f"name the column with {flag}")
        labels = [parse_label(v) for v in df[label_key].tolist()]
        stats.add(stats.seen, len(labels))
        stats.add(stats.no_label, sum(label is None for label in labels))
        bad = [label for label in labels if label is not None and not 0 <= label < builder.num_classes]
        if bad:
            stats.add(stats.out_of_range, len(bad))
            stats.bad_id.value = bad[0]
        keep = [i for i, label in enumerate(labels) if label is not None and 0 <= label < builder.num_classes]
        self.images = [str(df[img_key].iloc[i]) for i in keep]
        self.labels = [labels[i] for i in keep]
        self.transforms, self.builder, self.tokenizer, self.seed = transforms, builder, tokenizer, seed
        self.preprocess_plain = preprocess_plain
        self.epoch = 0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, idx):
        raw = Image.open(self.images[idx]).convert("RGB")
        rng = random.Random(hash((self.seed, self.epoch, idx)) & 0xFFFFFFFF)
        text, spurious = self.builder(self.labels[idx], rng)
        sample = (self.transforms(raw), text, spurious, self.labels[idx])
        if self.preprocess_plain is not None:
            sample += (self.preprocess_plain(raw), self.images[idx])
        return sample


class _CsvDataInfo(DataInfo):
    def set_epoch(self, epoch):
        super().set_epoch(epoch)
        self.dataloader.dataset.epoch = epoch


def get_csv_train_data(args, preprocess_img, builder: CaptionBuilder, epoch: int = 0, tokenizer=None,
                       preprocess_plain=None) -> DataInfo:
    stats = LabelStats()
    dataset = LabelledCsvDataset(args.train_data, preprocess_img, builder, tokenizer, args.csv_img_key,
                                 args.starft_csv_label_key, args.csv_separator, args.seed, stats, preprocess_plain)
    stats.check(args.starft_max_skipped_fraction, builder.num_classes, repr(args.train_data), final=True)
    sampler = DistributedSampler(dataset) if args.distributed else None
    dataloader = DataLoader(dataset, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                            num_workers=args.workers, drop_last=True, collate_fn=Collate(tokenizer))
    if len(dataloader) == 0:
        raise StarftError(f"--train-data {args.train_data!r} has {len(dataset)} labelled rows, fewer than one batch "
                          f"of {args.batch_size}: lower --batch-size")
    dataloader.num_samples = len(dataset)
    dataloader.num_batches = len(dataloader)
    info = _CsvDataInfo(dataloader, sampler)
    info.label_stats = stats
    return info


def get_train_data(args, preprocess_img, builder: CaptionBuilder, epoch: int = 0, tokenizer=None,
                   preprocess_plain=None) -> DataInfo:
    """The StarFT training data for ``--dataset-type`` webdataset, csv or auto; with
    ``preprocess_plain`` (the eval transform) batches also carry un-augmented images and sample ids."""
    kind = args.dataset_type
    if kind == "auto":
        ext = args.train_data.split("::")[0].rsplit(".", 1)[-1]
        kind = {"csv": "csv", "tsv": "csv", "tar": "webdataset"}.get(ext)
        if kind is None:
            raise StarftError(f"cannot tell the type of --train-data {args.train_data!r}: pass --dataset-type webdataset or csv")
    if kind == "webdataset":
        return get_wds_train_data(args, preprocess_img, builder, epoch, tokenizer, preprocess_plain)
    if kind == "csv":
        return get_csv_train_data(args, preprocess_img, builder, epoch, tokenizer, preprocess_plain)
    raise StarftError(f"--dataset-type {args.dataset_type} has no class labels: StarFT trains on webdataset shards "
                      "with 'cls' or a CSV with a label column")
