"""Training data for StarFT: class-labelled images → (image, caption, spurious caption, label).

Webdataset shards hold an image (``jpg``/``jpeg``/``png``/``webp``) and an integer class id
(``cls``) per sample. The pipeline follows upstream's (``open_clip_train.data``): its shard lists,
resampling, deterministic shard shuffle and node/worker splitting; then StarFT's tail: shards read
to their verified end (``data.samples.iter_shard``: a truncated tar is counted and named, not
read half), a sample shuffle seeded by (seed, epoch, rank, worker, pass), a label check, images
decoded 16-bit-safe (``data.samples.open_rgb``), captions drawn per sample from (seed, epoch,
sample key), and batches of ``(images [B,3,H,W], texts [B,L], spurious [B,L], labels [B])``.
A CSV (``--dataset-type csv``) gives image paths and labels instead.

Because the order is a function of the seed and the epoch only, ``data["train"].start_from(epoch,
k)`` makes the next pass over ``epoch`` yield exactly the batches an uninterrupted epoch yields
after its first ``k`` (step-exact resume); the skipped samples are dropped before augmentation.

Before training, ``data.checks.prescan_shards`` reads the first shard (all shards when they are
few or small) without decoding and names broken shards, samples without ``cls`` or image, and
out-of-range ids. Every sample dropped, for whatever reason (no image, no usable label, an unreadable
image or a failed augmentation), is counted once through ``LabelStats.skip`` (``data.checks``);
the training loop logs the counts and stops with a clear error when the skipped share passes
``--starft-max-skipped-fraction`` (decided only when it is certain, see ``LabelStats.check``) or
a class id is outside the class names.
"""
from __future__ import annotations

import dataclasses
import io
import itertools
import logging
import math
import os
import random
from multiprocessing import Value

import pandas as pd
import torch
import webdataset as wds
from open_clip_train.data import DataInfo, ResampledShards2, SharedEpoch, detshuffle2, get_dataset_size
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torch.utils.data.distributed import DistributedSampler

from open_clip_starft.data.checks import LabelStats, check_shards_exist, prescan_shards
from open_clip_starft.data.samples import IMAGE_KEYS, BrokenShard, iter_shard, open_rgb, parse_label
from open_clip_starft.method.captions import CaptionBuilder, warn_long_captions
from open_clip_starft.errors import StarftError

# Upstream's buffer sizes (open_clip_train.data keeps them private; the same values here).
SHARD_SHUFFLE_SIZE, SHARD_SHUFFLE_INITIAL = 2000, 500
SAMPLE_SHUFFLE_SIZE, SAMPLE_SHUFFLE_INITIAL = 5000, 1000


def _worker() -> tuple[int, int]:
    """``(worker id, number of workers)`` of this data-loader worker; ``(0, 1)`` in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def sample_rng(seed: int, epoch: int, sample: dict) -> random.Random:
    """The caption RNG of one sample: a function of the run's seed, the epoch and the sample's
    shard name and key only, so a sample's captions do not depend on workers, ranks or what was
    skipped before it (step-exact resume)."""
    shard = os.path.basename(str(sample.get("__url__", "")))
    return random.Random(f"{seed}/{epoch}/{shard}/{sample['__key__']}")


class _ShardSamples:
    """Pipeline stage: ``{"url"}`` → the shard's samples (``iter_shard``: grouped, checked to the
    archive's end). A broken shard is counted and named once per worker in a warning, and its
    sample at the damage dropped; an empty shard is named in a warning."""

    def __init__(self, stats: LabelStats):
        self.stats = stats
        self.warned: set[str] = set()

    def __call__(self, sources):
        for source in sources:
            url = source["url"]
            count = 0
            try:
                for sample in iter_shard(url):
                    count += 1
                    yield sample
            except BrokenShard as e:
                self.stats.broken_shard(str(e))
                if url not in self.warned:
                    self.warned.add(url)
                    logging.warning(f"Skipping unreadable training data: {e}; its later samples are lost (rewrite the "
                                    "shard, e.g. with open-clip-starft make-shards, or drop it from --train-data)")
                continue
            if count == 0 and url not in self.warned:
                self.warned.add(url)
                logging.warning(f"training shard {url} holds no samples (an empty tar)")


@dataclasses.dataclass
class WorkerPass:
    """Where one copy of the pipeline (one per data-loader worker process) is: the state its stages
    share. Made once in ``get_wds_train_data`` and given to the constructor of every stage that reads
    it (``_SplitByWorker``, ``_Shuffle``, ``_WorkerSeed``; ``LabelStats``, which counts the first pass only) and of
    ``_EpochPipeline``, the only one that writes it (``begin_epoch`` in each worker, ``pass_index`` at
    each pass); stages only read.

    ``worker`` of ``workers``: the worker of the uninterrupted epoch this copy reads for. After
    ``start_from(epoch, k)`` the DataLoader's worker ``w`` reads for worker ``(w + k) % workers``: the
    DataLoader takes batches round-robin starting at its worker 0, so its first batch then comes from
    the worker that made batch ``k``. ``pass_index``: the pass over the worker's shards within the
    epoch (0 first; an epoch needs more passes when samples are skipped)."""

    worker: int = 0
    workers: int = 1
    pass_index: int = 0

    def begin_epoch(self, worker: int, workers: int) -> None:
        self.worker, self.workers, self.pass_index = worker, workers, 0


class _SplitByWorker:
    """Pipeline stage: this worker's share of the shard list (``wds.split_by_worker`` by ``WorkerPass``)."""

    def __init__(self, position: WorkerPass):
        self.position = position

    def __call__(self, sources):
        yield from itertools.islice(sources, self.position.worker, None, self.position.workers)


class _Shuffle:
    """Pipeline stage: upstream's sample shuffle buffer, with an RNG seeded by (seed, epoch, rank,
    worker, pass) instead of the time, so the sample order repeats exactly run to run. Called once at
    the start of each pass (webdataset builds a pass's stages eagerly), after ``pass_index`` is set."""

    def __init__(self, seed: int, rank: int, epoch: SharedEpoch, position: WorkerPass):
        self.seed, self.rank, self.epoch, self.position = seed, rank, epoch, position

    def __call__(self, samples):
        position = self.position
        rng = random.Random(f"shuffle/{self.seed}/{self.epoch.get_value()}/{self.rank}/{position.worker}/{position.pass_index}")
        return wds.shuffle(bufsize=SAMPLE_SHUFFLE_SIZE, initial=SAMPLE_SHUFFLE_INITIAL, rng=rng)(samples)


class _LabelledSamples:
    """Pipeline stage: keep samples with an image and a usable in-range ``cls``; count the rest
    (``LabelStats.skip``: counted in a worker's first pass over its shards in an epoch only)."""

    def __init__(self, stats: LabelStats, num_classes: int):
        self.stats, self.num_classes = stats, num_classes

    def __call__(self, samples):
        stats = self.stats
        for sample in samples:
            stats.add(stats.seen)
            if not any(k in sample for k in IMAGE_KEYS):
                stats.skip("no_image")
                continue
            label = parse_label(sample.get("cls"))
            if label is None:
                stats.skip("no_label")
                continue
            if not 0 <= label < self.num_classes:
                stats.skip("out_of_range", label=label)
                continue
            stats.add(stats.kept)
            sample["__label__"] = label
            yield sample


def _decodable(data: bytes) -> None:
    """Raise as decoding would, at a fraction of its cost (JPEGs at 1/8 scale): for skipped samples."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (1, 1))
        image.load()


class _DecodeImages:
    """Pipeline stage: the sample's image (first of ``IMAGE_KEYS``) decoded to 8-bit RGB under
    ``image`` (``open_rgb``: 16-bit images scaled, not clipped white); an unreadable image is
    counted and named (shard and key) in a warning.

    ``start(batches, batch_size)``: the samples of this worker's first ``batches`` batches of the
    epoch are dropped undecoded (a resumed epoch already trained on them), across passes: where a
    pass ends while skipping, its last ``skipped % batch_size`` samples made no batch (the
    uninterrupted epoch dropped them as a partial batch), so they are not counted as skipped."""

    def __init__(self, stats: LabelStats):
        self.stats = stats
        self.skip, self.batch_size = 0, 1
        self.skipped_this_pass = 0

    def start(self, batches: int, batch_size: int):
        self.skip, self.batch_size = batches * batch_size, batch_size

    def __call__(self, samples):
        self.skipped_this_pass = 0
        for sample in samples:
            key = next(k for k in IMAGE_KEYS if k in sample)
            data = sample.pop(key)
            for other in IMAGE_KEYS:
                sample.pop(other, None)
            try:
                if not data:
                    raise ValueError("the image is empty (0 bytes)")
                if self.skip > 0:
                    _decodable(data)
                else:
                    sample["image"] = open_rgb(data)
            except Exception as e:  # noqa: BLE001 - any undecodable image is skipped and named
                message = (f"unreadable image {key!r} of sample {sample['__key__']!r} in shard "
                           f"{sample.get('__url__', '?')} ({type(e).__name__}: {e})")
                self.stats.skip("undecodable", message=message)
                logging.warning(f"Skipping an {message}")
                continue
            if self.skip > 0:
                self.skip -= 1
                self.skipped_this_pass += 1
                continue
            yield sample
        if self.skip > 0:  # the pass ended while skipping: its partial batch was never a batch
            self.skip += self.skipped_this_pass % self.batch_size


class _AddCaptions:
    """Pipeline stage: a clean and a spurious caption per sample, from ``sample_rng``."""

    def __init__(self, builder: CaptionBuilder, seed: int, epoch: SharedEpoch):
        self.builder, self.seed, self.epoch = builder, seed, epoch

    def __call__(self, samples):
        epoch = self.epoch.get_value()
        for sample in samples:
            sample["text"], sample["spurious"] = self.builder(sample["__label__"], sample_rng(self.seed, epoch, sample))
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
    """The augmentation stage's error handler: count the dropped sample, warn, go on."""
    def handler(exn):
        stats.skip("undecodable", message=f"augmentation failed: {type(exn).__name__}: {exn}")
        logging.warning(f"Skipping unreadable training data ({exn!r}).")
        return True
    return handler


class _ResumePoint:
    """Where a resumed epoch starts (``start_from``), shared with data-loader workers."""

    def __init__(self):
        self.epoch = Value("l", -1)
        self.batches = Value("l", 0)

    def set(self, epoch: int, batches_done: int):
        self.epoch.value, self.batches.value = epoch, batches_done

    def place(self, epoch: int, worker: int, workers: int) -> tuple[int, int]:
        """``(worker of the uninterrupted epoch that DataLoader worker ``worker`` reads for, batches
        that worker already yielded)``: after ``k`` batches worker ``v`` made ``ceil((k - v) / workers)``."""
        k = self.batches.value if self.epoch.value == epoch else 0
        virtual = (worker + k) % workers
        return virtual, max(0, -(-(k - virtual) // workers))


class _EpochPipeline(wds.DataPipeline):
    """The per-worker training pipeline of one epoch: ``batches`` batches (fewer after
    ``start_from``: the ones already trained on are skipped), repeating the worker's shards when
    they run out, and stopping when a whole pass gives no batch (no labelled sample), where
    webdataset's ``with_epoch`` would spin forever."""

    def __init__(self, *stages, batches: int, batch_size: int, epoch: SharedEpoch, resume: _ResumePoint,
                 decoder: _DecodeImages, position: WorkerPass):
        super().__init__(*stages)
        self.batches, self.batch_size, self.epoch, self.resume = batches, batch_size, epoch, resume
        self.decoder, self.position = decoder, position

    def __iter__(self):
        worker, workers = _worker()
        virtual, done = self.resume.place(self.epoch.get_value(), worker, workers)
        done = min(self.batches, done)
        self.position.begin_epoch(virtual, workers)
        self.decoder.start(done, self.batch_size)
        return itertools.islice(self.passes(), self.batches - done)

    def passes(self):
        for index in itertools.count():
            self.position.pass_index = index
            empty = True
            for item in self.iterator1():
                empty = False
                yield item
            if empty and not self.decoder.skipped_this_pass:
                return


@dataclasses.dataclass
class _WdsTrainData(DataInfo):
    """The webdataset training data: upstream's ``DataInfo`` plus ``label_stats`` (the counts the
    pipeline keeps), ``resume`` (where a resumed epoch starts, see ``start_from``) and
    ``labelled_budget`` (at most this many labelled samples per epoch and process: the bound the
    label check uses)."""

    label_stats: LabelStats = None
    resume: _ResumePoint = None
    labelled_budget: int = 0

    def __post_init__(self):
        self.label_stats.start_epoch(self.labelled_budget)

    def set_epoch(self, epoch):
        super().set_epoch(epoch)
        self.label_stats.start_epoch(self.labelled_budget)

    def start_from(self, epoch: int, batches_done: int):
        """The next pass over ``epoch`` yields exactly the batches an uninterrupted epoch yields
        after its first ``batches_done``, in the same order (call before iterating the epoch)."""
        self.resume.set(epoch, batches_done)


class _WorkerSeed:
    """``ResampledShards2``'s worker seed from the run's seed, rank and worker (not the torch RNG
    state at the first iteration, which a resumed run does not reproduce)."""

    def __init__(self, seed: int, rank: int, position: WorkerPass):
        self.seed, self.rank, self.position = seed, rank, position

    def __call__(self) -> int:
        return random.Random(f"resample/{self.seed}/{self.rank}/{self.position.worker}").getrandbits(48)


def _epoch_samples(args, pattern: str, urls: list[str], readers: int) -> int:
    """The samples of one epoch (``--train-num-samples``, else ``sizes.json``), after checking that the
    settings can read the shards: upsampling factors need resampling, and without it every reader
    (``readers`` per process) needs a shard."""
    resampled = getattr(args, "dataset_resampled", False)
    if args.train_num_samples is not None:
        num_samples, num_shards = args.train_num_samples, None
    else:
        num_samples, num_shards = get_dataset_size(pattern)
        if not num_samples:
            raise StarftError(f"--train-data {pattern!r} has no sizes.json or __len__ beside its shards: "
                              "pass --train-num-samples N")
    if args.train_data_upsampling_factors is not None and not resampled:
        raise StarftError("--train-data-upsampling-factors needs --dataset-resampled")
    if not resampled:
        num_shards = num_shards or len(urls)
        if num_shards < readers * args.world_size:
            raise StarftError(f"--train-data has {num_shards} shard(s) for {readers} reader(s) × {args.world_size} "
                              f"process(es) (--workers {args.workers}; 0 reads in the main process): use fewer "
                              "--workers or processes, or more shards (each reader needs one)")
    return num_samples


def _shard_stages(args, pattern: str, shared_epoch: SharedEpoch, position: WorkerPass) -> list:
    """Upstream's shard list stages: resampled with replacement (``--dataset-resampled``), else the
    list shuffled per epoch and split by node and worker."""
    if getattr(args, "dataset_resampled", False):
        return [ResampledShards2(pattern, weights=args.train_data_upsampling_factors, deterministic=True,
                                 worker_seed=_WorkerSeed(args.seed, args.rank, position), epoch=shared_epoch)]
    return [
        wds.SimpleShardList(pattern),
        detshuffle2(bufsize=SHARD_SHUFFLE_SIZE, initial=SHARD_SHUFFLE_INITIAL, seed=args.seed, epoch=shared_epoch),
        wds.split_by_node,
        _SplitByWorker(position),
    ]


def _sample_stages(args, builder: CaptionBuilder, stats: LabelStats, shared_epoch: SharedEpoch, position: WorkerPass,
                   decoder: _DecodeImages, preprocess_img, preprocess_plain, tokenizer) -> list:
    """StarFT's tail, shard URLs → batches: checked reading, seeded shuffle, label check, decoding,
    captions, (plain images,) augmentation, batching."""
    plain = ("plain", "__sample_id__") if preprocess_plain else ()
    return [
        _ShardSamples(stats),
        _Shuffle(args.seed, args.rank, shared_epoch, position),
        _LabelledSamples(stats, builder.num_classes),
        decoder,
        _AddCaptions(builder, args.seed, shared_epoch),
        *([_AddPlainImage(preprocess_plain)] if preprocess_plain else []),
        wds.map_dict(image=preprocess_img, handler=_counting_handler(stats)),
        wds.to_tuple("image", "text", "spurious", "__label__", *plain),
        wds.batched(args.batch_size, collation_fn=Collate(tokenizer), partial=False),
    ]


def get_wds_train_data(args, preprocess_img, builder: CaptionBuilder, epoch: int = 0, tokenizer=None,
                       preprocess_plain=None) -> DataInfo:
    """Upstream's training shard pipeline with StarFT's labelled tail (see the module docstring).
    With ``preprocess_plain`` each sample also carries its un-augmented image and an id."""
    pattern = args.train_data
    urls = check_shards_exist(pattern)
    readers = max(1, args.workers)  # a process with --workers 0 reads in its main process: one reader
    num_samples = _epoch_samples(args, pattern, urls, readers)
    # callers outside the CLI (benchmarks) may set no threshold: the pre-scan then only warns
    prescan_shards(urls, builder.num_classes, getattr(args, "starft_max_skipped_fraction", 1.0), repr(pattern),
                   warn=args.rank == 0)
    if tokenizer is not None and args.rank == 0:
        warn_long_captions(builder, tokenizer, "training captions")

    shared_epoch, position = SharedEpoch(epoch=epoch), WorkerPass()
    stats = LabelStats(position)  # counts each worker's first pass over its shards in an epoch only
    decoder = _DecodeImages(stats)
    # As upstream: every worker yields the same number of full batches, so all ranks step together.
    global_batch_size = args.batch_size * args.world_size
    num_worker_batches = math.ceil(math.ceil(num_samples / global_batch_size) / readers)
    resume = _ResumePoint()
    dataset = _EpochPipeline(*_shard_stages(args, pattern, shared_epoch, position),
                             *_sample_stages(args, builder, stats, shared_epoch, position, decoder, preprocess_img,
                                             preprocess_plain, tokenizer),
                             batches=num_worker_batches, batch_size=args.batch_size, epoch=shared_epoch, resume=resume,
                             decoder=decoder, position=position)
    dataloader = wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=args.workers,
                               persistent_workers=args.workers > 0)
    dataloader.num_batches = num_worker_batches * readers
    dataloader.num_samples = dataloader.num_batches * global_batch_size
    # At most this many labelled samples per epoch and process: each reader's batches, plus a partial
    # batch dropped at the end of each pass (a pass gives at least one batch, or the epoch stops).
    budget = readers * (num_worker_batches * args.batch_size + (num_worker_batches + 1) * (args.batch_size - 1))
    return _WdsTrainData(dataloader=dataloader, shared_epoch=shared_epoch, label_stats=stats, resume=resume,
                         labelled_budget=budget)


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
        stats.skip("no_label", sum(label is None for label in labels))
        bad = [label for label in labels if label is not None and not 0 <= label < builder.num_classes]
        if bad:
            stats.skip("out_of_range", len(bad), label=bad[0])
        keep = [i for i, label in enumerate(labels) if label is not None and 0 <= label < builder.num_classes]
        self.images = [str(df[img_key].iloc[i]) for i in keep]
        self.labels = [labels[i] for i in keep]
        self.transforms, self.builder, self.tokenizer, self.seed = transforms, builder, tokenizer, seed
        self.preprocess_plain = preprocess_plain
        self.epoch = 0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, idx):
        raw = open_rgb(self.images[idx])
        rng = random.Random(hash((self.seed, self.epoch, idx)) & 0xFFFFFFFF)
        text, spurious = self.builder(self.labels[idx], rng)
        sample = (self.transforms(raw), text, spurious, self.labels[idx])
        if self.preprocess_plain is not None:
            sample += (self.preprocess_plain(raw), self.images[idx])
        return sample


class _CsvOrder(DistributedSampler):
    """The CSV rows' order: ``DistributedSampler``'s permutation seeded by ``--seed`` and the epoch
    (one process: all rows), so it repeats run to run; ``start_from`` drops a resumed epoch's
    first batches. Batches are drawn in the main process, so workers do not change the order."""

    def __init__(self, dataset, world_size: int, rank: int, seed: int, batch_size: int):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.batch_size, self.resume = batch_size, (-1, 0)

    def _skip(self) -> int:
        return self.resume[1] * self.batch_size if self.resume[0] == self.epoch else 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self._skip(), None)

    def __len__(self):
        return max(0, self.num_samples - self._skip())


@dataclasses.dataclass
class _CsvDataInfo(DataInfo):
    """The CSV training data: upstream's ``DataInfo`` (``sampler``: the rows' order, ``_CsvOrder``)
    plus ``label_stats`` (the rows skipped for their label) and ``start_from``."""

    label_stats: LabelStats = None

    def set_epoch(self, epoch):
        super().set_epoch(epoch)
        self.dataloader.dataset.epoch = epoch

    def start_from(self, epoch: int, batches_done: int):
        """The next pass over ``epoch`` yields exactly the batches an uninterrupted epoch yields
        after its first ``batches_done`` (call before iterating the epoch)."""
        self.sampler.resume = (epoch, batches_done)


def get_csv_train_data(args, preprocess_img, builder: CaptionBuilder, epoch: int = 0, tokenizer=None,
                       preprocess_plain=None) -> DataInfo:
    stats = LabelStats()
    dataset = LabelledCsvDataset(args.train_data, preprocess_img, builder, tokenizer, args.csv_img_key,
                                 args.starft_csv_label_key, args.csv_separator, args.seed, stats, preprocess_plain)
    stats.check(args.starft_max_skipped_fraction, builder.num_classes, repr(args.train_data), final=True)
    if tokenizer is not None and args.rank == 0:
        warn_long_captions(builder, tokenizer, "training captions")
    sampler = _CsvOrder(dataset, args.world_size, args.rank, args.seed, args.batch_size)
    dataloader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                            num_workers=args.workers, drop_last=True, collate_fn=Collate(tokenizer))
    if len(dataloader) == 0:
        raise StarftError(f"--train-data {args.train_data!r} has {len(dataset)} labelled rows, fewer than one batch "
                          f"of {args.batch_size}: lower --batch-size")
    dataloader.num_samples = len(dataset)
    dataloader.num_batches = len(dataloader)
    return _CsvDataInfo(dataloader, sampler, label_stats=stats)


def train_data_kind(args) -> str:
    """``--dataset-type``, with ``auto`` told from the ``--train-data`` file extension (webdataset or csv)."""
    kind = args.dataset_type
    if kind == "auto":
        ext = args.train_data.split("::")[0].rsplit(".", 1)[-1]
        kind = {"csv": "csv", "tsv": "csv", "tar": "webdataset"}.get(ext)
        if kind is None:
            raise StarftError(f"cannot tell the type of --train-data {args.train_data!r}: pass --dataset-type webdataset or csv")
    return kind


def get_train_data(args, preprocess_img, builder: CaptionBuilder, epoch: int = 0, tokenizer=None,
                   preprocess_plain=None) -> DataInfo:
    """The StarFT training data for ``--dataset-type`` webdataset, csv or auto; with
    ``preprocess_plain`` (the eval transform) batches also carry un-augmented images and sample ids."""
    kind = train_data_kind(args)
    if kind == "webdataset":
        return get_wds_train_data(args, preprocess_img, builder, epoch, tokenizer, preprocess_plain)
    if kind == "csv":
        return get_csv_train_data(args, preprocess_img, builder, epoch, tokenizer, preprocess_plain)
    raise StarftError(f"--dataset-type {args.dataset_type} has no class labels: StarFT trains on webdataset shards "
                      "with 'cls' or a CSV with a label column")
