"""What the training data is checked for, before and during training.

``check_shards_exist`` (the pattern matches files), ``prescan_shards`` (the first shard, or all
when they are few or small, read without decoding before the first step: broken or empty
shards, samples without ``cls`` or image, class ids beyond the names) and ``LabelStats`` (the
counts the pipeline keeps while it reads, and the skipped-share rule that stops a run only when
the end of the epoch is certain to be over ``--starft-max-skipped-fraction``).
"""
from __future__ import annotations

import logging
import os
from multiprocessing import Array, Value

from open_clip_train.data import expand_urls

from open_clip_starft.data.samples import IMAGE_KEYS, BrokenShard, is_local_url, iter_shard, parse_label
from open_clip_starft.errors import DataError, StarftError

PRESCAN_ALL_SHARDS, PRESCAN_ALL_BYTES = 4, 256 << 20  # the pre-scan reads every shard up to these, else the first


SKIP_CAUSES = {
    "no_label": "without a usable 'cls' label",
    "no_image": "without an image",
    "undecodable": "with an unreadable image (or a failed augmentation)",
    "out_of_range": "with a class id beyond the class names",
}
"""Why a training sample is dropped: the ``LabelStats`` counter of each cause, and its words in the summary."""


class LabelStats:
    """Counts shared with data-loader workers (multiprocessing values, like upstream's SharedEpoch).

    ``seen``: samples read; ``kept``: of them with an image and an in-range label; one counter per
    ``SKIP_CAUSES`` entry for the samples dropped (``skip``, the one way to count one: ``no_label``,
    ``no_image``, ``out_of_range`` (the last such id in ``bad_id``) and ``undecodable``, kept samples
    whose image cannot be decoded or augmented); ``broken_shards``: shard reads that stopped at damage
    (their later samples are never read, so never counted); ``last_error``: the last unreadable sample or
    shard, in one line; ``horizon``: an upper bound of ``kept - undecodable`` (the samples batched) at
    the end of the current epoch (``start_epoch``), -1 when unknown.

    With a ``position`` (the pipeline's ``WorkerPass``: ``pass_index``) only a worker's first pass over
    its shards in an epoch is counted: an epoch needs more passes when samples are dropped, and the
    repeats would count the same sample twice (32 unreadable of 64 read as 64)."""

    def __init__(self, position=None):
        self.position = position
        self.seen = Value("l", 0)
        self.kept = Value("l", 0)
        for cause in SKIP_CAUSES:
            setattr(self, cause, Value("l", 0))
        self.bad_id = Value("l", 0)
        self.broken_shards = Value("l", 0)
        self.last_error = Array("c", 400)
        self.horizon = Value("l", -1)

    @property
    def counting(self) -> bool:
        """False in a worker's repeat passes over the samples it counted already this epoch."""
        return self.position is None or self.position.pass_index == 0

    def add(self, counter, amount=1):
        """Count ``amount`` samples read (``seen``) or kept (``kept``); a dropped one goes through ``skip``."""
        if self.counting:
            with counter.get_lock():
                counter.value += amount

    def skip(self, cause: str, amount: int = 1, *, message: str | None = None, label: int | None = None):
        """Count ``amount`` dropped samples under ``cause`` (a ``SKIP_CAUSES`` key), whatever the stage that
        drops them: every one counts toward ``--starft-max-skipped-fraction`` and is named in ``summary``.
        ``message``: the unreadable sample's one-line description; ``label``: the out-of-range class id."""
        if message is not None:
            self.last_error.value = message.encode("utf-8", "replace")[:399]
        if label is not None:
            self.bad_id.value = label
        self.add(getattr(self, cause), amount)

    def broken_shard(self, message: str):
        """Count a shard whose reading stopped at damage, and keep its description for the summary."""
        self.last_error.value = message.encode("utf-8", "replace")[:399]
        self.add(self.broken_shards)

    @property
    def skipped(self) -> int:
        """Samples dropped so far, every cause together."""
        return sum(getattr(self, cause).value for cause in SKIP_CAUSES)

    def start_epoch(self, labelled_budget: int):
        """The epoch about to run batches at most ``labelled_budget`` more labelled samples."""
        self.horizon.value = self.kept.value - self.undecodable.value + labelled_budget

    def summary(self) -> str:
        causes = ", ".join(f"{getattr(self, cause).value} {words}" for cause, words in SKIP_CAUSES.items())
        text = f"so far: samples read {self.seen.value}, skipped {self.skipped} ({causes})"
        if self.broken_shards.value:
            text += (f"; {self.broken_shards.value} unreadable shard read(s), whose samples after the damage "
                     "were never read")
        if self.undecodable.value or self.broken_shards.value:
            text += f" (last: {self.last_error.value.decode('utf-8', 'replace')})"
        return text

    def check(self, max_skipped_fraction: float, num_classes: int, source: str, final: bool = False):
        """Raise StarftError when a class id was out of range or too many samples were skipped.

        ``final`` (the end of an epoch): when the skipped share of the samples read (every cause of
        ``SKIP_CAUSES``) passes ``max_skipped_fraction``. Before that only when the end is certain to
        fail: ``skipped / (seen + labelled samples still to come) > max_skipped_fraction``, with the
        labelled samples still to come bounded by ``horizon`` (more skipped samples only raise the
        share), so a run whose share ends under the threshold is never stopped, however early its bad
        samples come."""
        if self.out_of_range.value:
            raise StarftError(
                f"{self.out_of_range.value} sample(s) in {source} have class ids outside the {num_classes} class names "
                f"(e.g. {self.bad_id.value}): pass --starft-classnames with a file that names every class id")
        seen, skipped = self.seen.value, self.skipped
        if not seen or not skipped:
            return
        if final:
            bound = seen
        elif self.horizon.value < 0:
            return
        else:
            bound = seen + max(0, self.horizon.value - (self.kept.value - self.undecodable.value))
        if skipped / bound > max_skipped_fraction:
            broken = (f"; {self.broken_shards.value} shard read(s) stopped at damage, so check the shards too"
                      if self.broken_shards.value else "")
            raise StarftError(
                f"{skipped} of {seen} samples in {source} were skipped ({self.summary()}): every sample needs a "
                f"readable image and an integer class id under the key 'cls' (or raise --starft-max-skipped-fraction, "
                f"now {max_skipped_fraction}){broken}")


def missing_local_shards(urls: list[str]) -> tuple[list[str], list[str]]:
    """``(local, missing)``: the local URLs of ``urls`` (``is_local_url``) and those of them that do not
    exist. The one test both training data and eval sets refuse on."""
    local = [u for u in urls if is_local_url(u)]
    return local, [u for u in local if not os.path.exists(u)]


def check_shards_exist(pattern: str) -> list[str]:
    """The shard URLs of ``pattern``; a one-line DataError when a local one does not exist (remote URLs
    pass): a pattern with some shards missing would train on the others or stop in upstream's reader."""
    urls, _ = expand_urls(pattern)
    local, missing = missing_local_shards(urls)
    if local and len(missing) == len(local):
        raise DataError(f"--train-data {pattern!r} matches no file (first: {missing[0]!r}): "
                        "check the path and the brace pattern, e.g. 'shards/train-{0000..0099}.tar'")
    if missing:
        raise DataError(f"{len(missing)} of {len(local)} shards of --train-data {pattern!r} do not exist (first: "
                        f"{missing[0]!r}): fix the pattern, or write the missing shards")
    return urls


def prescan_shards(urls: list[str], num_classes: int, max_skipped_fraction: float, source: str,
                   warn: bool = True) -> dict:
    """Read the first local shard, or all of them when there are at most ``PRESCAN_ALL_SHARDS`` or
    they hold at most ``PRESCAN_ALL_BYTES``, without decoding images, before the first step.

    Warns (when ``warn``) naming each broken or empty shard and the shards with samples without a
    usable ``cls`` or an image (with their keys). Raises a one-line StarftError for a class id
    outside the class names, and, when every shard was read, for data with no usable sample or
    whose skipped share passes ``max_skipped_fraction`` (the share an epoch over all of it would
    end with). Returns the counts ``{"shards", "all", "samples", "skipped", "broken"}``."""
    local = [u for u in urls if is_local_url(u) and os.path.isfile(u)]
    if not local:
        return {"shards": 0, "all": False, "samples": 0, "skipped": 0, "broken": 0}
    every = len(local) == len(urls) and (len(local) <= PRESCAN_ALL_SHARDS
                                         or sum(os.path.getsize(u) for u in local) <= PRESCAN_ALL_BYTES)
    scan = local if every else local[:1]
    samples = skipped = broken = 0
    notes = []
    for url in scan:
        count, bad = 0, {}
        try:
            for sample in iter_shard(url):
                count += 1
                if not any(k in sample for k in IMAGE_KEYS):
                    bad.setdefault("no image", []).append(sample["__key__"])
                    continue
                label = parse_label(sample.get("cls"))
                if label is None:
                    bad.setdefault("no usable 'cls' label", []).append(sample["__key__"])
                elif not 0 <= label < num_classes:
                    raise StarftError(f"sample {sample['__key__']!r} in shard {url} has class id {label}, outside the "
                                      f"{num_classes} class names of --starft-classnames: pass a file that names every class id")
        except BrokenShard as e:
            broken += 1
            notes.append(f"{e} (its later samples are skipped and counted as unreadable; rewrite it)")
        if count == 0 and not broken:
            notes.append(f"shard {url} holds no samples (an empty tar)")
        for cause, keys in bad.items():
            notes.append(f"shard {url}: {len(keys)} of {count} samples have {cause} (e.g. "
                         f"{', '.join(map(repr, keys[:3]))}) and will be skipped")
        samples += count
        skipped += sum(map(len, bad.values()))
    if warn:
        for note in notes:
            logging.warning(f"--train-data pre-scan: {note}")
    if every and samples and skipped / samples > max_skipped_fraction:
        raise StarftError(f"{skipped} of {samples} samples in --train-data {source} would be skipped "
                          f"({'; '.join(n for n in notes if 'will be skipped' in n)}): every sample needs an image and an "
                          f"integer class id under the key 'cls' (or raise --starft-max-skipped-fraction, now "
                          f"{max_skipped_fraction})")
    if every and samples == 0 and broken:
        raise StarftError(f"--train-data {source}: no shard can be read ({notes[0]}): rewrite the shards, e.g. with "
                          "open-clip-starft make-shards")
    if every and samples - skipped <= 0:
        raise StarftError(f"--train-data {source} holds no usable sample ({samples} read in {len(scan)} shard(s), "
                          f"{skipped} skipped without an image or a usable 'cls' label, {broken} broken shard(s)): every "
                          "sample needs an image and an integer class id under the key 'cls'")
    return {"shards": len(scan), "all": every, "samples": samples, "skipped": skipped, "broken": broken}
