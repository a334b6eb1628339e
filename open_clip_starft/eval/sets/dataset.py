"""Reading a prepared set's samples: batches of preprocessed images with labels and groups;
unreadable samples are dropped from the batch and named, never fatal."""
from __future__ import annotations

import tarfile
from typing import Iterator

import torch
from PIL import Image

from open_clip_starft.data.samples import IMAGE_KEYS, BrokenShard, iter_shard, open_rgb, parse_label, to_rgb
from open_clip_starft.errors import StarftError, one_line
from open_clip_starft.eval.sets.spec import Item, PreparedSet


def open_image(ref, crop_border: int = 0) -> Image.Image:
    """An item's image as 8-bit RGB (``open_rgb``: 16-bit images scaled, not clipped): ``ref`` is a
    path, encoded bytes or an ``[H, W, 3]`` uint8 array; ``crop_border`` pixels cut from each side."""
    image = to_rgb(Image.fromarray(ref)) if not isinstance(ref, (str, bytes, bytearray)) else open_rgb(ref)
    if crop_border:
        w, h = image.size
        image = image.crop((crop_border, crop_border, w - crop_border, h - crop_border))
    return image


class ItemDataset(torch.utils.data.Dataset):
    """Map-style samples ``(image tensor or None when unreadable, label, group, ref name)``."""

    def __init__(self, items: list[Item], preprocess, crop_border: int = 0):
        self.items, self.preprocess, self.crop_border = items, preprocess, crop_border

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        it = self.items[i]
        name = it.ref if isinstance(it.ref, str) else f"#{i}"
        try:
            return self.preprocess(open_image(it.ref, self.crop_border)), it.label, it.group, name
        except Exception as e:  # noqa: BLE001 - an unreadable image is reported and skipped
            return None, it.label, it.group, f"{name} ({type(e).__name__}: {e})"


class DecodeShardSample:
    """A webdataset sample to ``(image tensor or None, label, group, "URL:KEY (why)")``."""

    def __init__(self, preprocess):
        self.preprocess = preprocess

    def __call__(self, sample):
        name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        label = parse_label(sample.get("cls"))
        group = parse_label(sample.get("group", b"0"))
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if label is None or group is None or key is None:
            what = "no usable 'cls'" if label is None else "no usable 'group'" if group is None else "no image"
            return None, -1, 0, f"{name} ({what})"
        try:
            return self.preprocess(open_image(sample[key])), label, group, name
        except Exception as e:  # noqa: BLE001
            return None, label, group, f"{name} ({type(e).__name__}: {e})"


def _every_shard(src):
    return src


def collate(samples):
    """``(images [B,3,H,W] or None, labels [B], groups [B], names [B], skipped names)``: unreadable
    samples are dropped and named."""
    kept = [s for s in samples if s[0] is not None]
    skipped = [s[3] for s in samples if s[0] is None]
    images = torch.stack([s[0] for s in kept]) if kept else None
    return (images, torch.tensor([s[1] for s in kept], dtype=torch.long),
            torch.tensor([s[2] for s in kept], dtype=torch.long), [s[3] for s in kept], skipped)


def batches(prepared: PreparedSet, preprocess, batch_size: int = 128, workers: int = 0) -> Iterator[tuple]:
    """Batches of ``collate``'s form over every sample of the set (in no particular order under workers);
    for shards listed in ``sizes.json``, a shard that gives another count is a one-line StarftError."""
    if prepared.items is not None:
        loader = torch.utils.data.DataLoader(ItemDataset(prepared.items, preprocess, prepared.crop_border),
                                             batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)
        yield from loader
        return
    import webdataset as wds
    dataset = (wds.WebDataset(prepared.shards, shardshuffle=False, nodesplitter=_every_shard)
               .map(DecodeShardSample(preprocess))
               .batched(batch_size, collation_fn=collate, partial=True))
    workers = min(workers, len(prepared.shards))
    loader = wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=workers)
    read: dict[str, int] = {}  # samples read per shard URL
    urls = set(prepared.shards)
    for images, labels, groups, names, skipped in _unreadable_shard_is_one_line(prepared, loader):
        for name in (*names, *skipped):
            url = _shard_of(name, urls)
            read[url] = read.get(url, 0) + 1
        if prepared.label_of is not None and len(labels):
            mapped = [prepared.label_of(int(lab)) for lab in labels]
            if any(m is None for m in mapped):
                bad = next((int(lab), n) for lab, m, n in zip(labels, mapped, names) if m is None)
                raise StarftError(f"eval set {prepared.name!r}: label {bad[0]} of {bad[1]} is not in the class subset: "
                                  "with subset_labels full every label must be a subset class id")
            labels = torch.tensor(mapped, dtype=torch.long)
        outside = (labels < 0) | (labels >= prepared.num_classes)
        if outside.any():
            i = int(outside.nonzero()[0])
            raise StarftError(f"eval set {prepared.name!r}: label {int(labels[i])} of {names[i]} is outside the "
                              f"{prepared.num_classes} class names ({prepared.settings['classnames']}): pass class names "
                              "(or a subset) that name every label")
        yield images, labels, groups, names, skipped
    check_shard_counts(prepared, read)


def _shard_of(name: str, urls: set[str]) -> str | None:
    """The shard URL of a sample name ``URL:KEY`` or ``URL:KEY (why)`` (URLs and keys may hold ':')."""
    end = len(name)
    while (end := name.rfind(":", 0, end)) > 0:
        if name[:end] in urls:
            return name[:end]
    return None


def _unreadable_shard_is_one_line(prepared: PreparedSet, loader):
    """The loader's batches; a shard that cannot be read (a tar cut inside a header, an I/O error)
    stops the set with a one-line StarftError naming the shard."""
    try:
        yield from loader
    except (tarfile.TarError, OSError, EOFError) as e:
        text = str(e)
        url = next((u for u in prepared.shards if u in text), None)
        detail = e.args[0] if e.args and isinstance(e.args[0], str) and "Traceback" not in e.args[0] else type(e).__name__
        raise StarftError(f"eval set {prepared.name!r}: cannot read shard {url or 'of ' + repr(prepared.root)} "
                          f"({type(e).__name__}: {one_line(detail, 120)}): the shard is truncated or damaged: write it again") from None


def check_shard_counts(prepared: PreparedSet, read: dict[str, int]) -> None:
    """Every shard was read to its end: a tar cut short ends quietly in Python's tarfile, which
    would score the set on part of its images without a word. A shard listed in ``sizes.json``
    must have given that count; one that is not is read again without decoding
    (``data.samples.iter_shard``, which checks the end-of-archive blocks)."""
    listed_sizes = prepared.shard_sizes or {}
    for url, listed in listed_sizes.items():
        if read.get(url, 0) != listed:
            raise StarftError(f"eval set {prepared.name!r}: shard {url!r} gave {read.get(url, 0)} samples but its sizes.json "
                              f"lists {listed}: the shard is truncated (write it again) or sizes.json is out of date (fix it)")
    for url in prepared.shards or ():
        if url not in listed_sizes:
            try:
                for _ in iter_shard(url):
                    pass
            except BrokenShard as e:
                raise StarftError(f"eval set {prepared.name!r}: cannot read shard {url!r} to its end ({e.cause}): "
                                  "the shard is truncated or damaged: write it again") from None
