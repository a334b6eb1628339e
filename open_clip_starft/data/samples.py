"""The sample format shared by training, eval and the tools.

A sample is a webdataset record: ``__key__``, one image under one of ``IMAGE_KEYS`` (encoded
bytes), an integer class id under ``cls`` and optionally a ``group`` id and other fields.
Here: the image keys, label parsing, image decoding to 8-bit RGB that is correct for 16- and
32-bit images (``to_rgb``, ``open_rgb``), the one tar shard writer (``write_shard``,
``write_shards``, ``brace_pattern``), the one ``sizes.json`` merge (``update_sizes``), which shard
URLs are local paths (``is_local_url``) and a shard reader that checks the archive reaches its end
(``iter_shard``, ``BrokenShard``: Python's tarfile stops quietly at a cut inside a header).
"""
from __future__ import annotations

import collections
import io
import itertools
import json
import os
import re

import numpy as np
from PIL import Image

from open_clip_starft.data import files

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")

# Pillow modes that hold more than 8 bits per pixel (one channel); ``.convert("RGB")`` clips them.
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def is_local_url(url: str) -> bool:
    """True for a shard URL that is a path on this machine (not ``scheme://`` nor ``pipe:``): the only kind
    checked before training or evaluation reads it."""
    return "://" not in url and not url.startswith("pipe:")


def parse_label(raw) -> int | None:
    """An integer class id from a ``cls`` field (bytes, str or int); None when unusable."""
    if raw is None:
        return None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        value = float(raw) if not isinstance(raw, int) else raw
    except (TypeError, ValueError):
        return None
    if value != value or int(value) != value:  # NaN or fractional
        return None
    return int(value)


def _high_bit_to_l(image: Image.Image) -> Image.Image:
    """A one-channel 16/32-bit image as 8-bit ``L``, scaled (not clipped).

    ``I;16*`` (16-bit, 0..65535) is divided by 257, so 65535 → 255. ``I`` (32-bit integer) and
    ``F`` (32-bit float) carry no declared range: ``F`` with values in [0, 1] is taken as
    0..1, values up to 255 are kept, up to 65535 are read as 16-bit (÷257, how Pillow opens
    some 16-bit files), larger ones are scaled by their maximum.
    """
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        scale = 1 / 257
    else:
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if lo < 0:  # signed data: shift to start at 0
            values, hi = values - lo, hi - lo
        if image.mode == "F" and hi <= 1.0:
            scale = 255.0
        elif hi <= 255:
            scale = 1.0
        elif hi <= 65535:
            scale = 1 / 257
        else:
            scale = 255.0 / hi
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB. 16-bit and 32-bit modes (``I;16``, ``I;16B``, ``I;16L``, ``I``,
    ``F``) are scaled to 8 bit (``_high_bit_to_l``), not clipped to white as ``.convert("RGB")``
    does; every other mode (L, P, LA, RGBA, CMYK, 1, ...) goes through Pillow's ``.convert("RGB")``."""
    if image.mode in _HIGH_BIT_MODES:
        image = _high_bit_to_l(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def open_rgb(source) -> Image.Image:
    """Decode an image file (a path, encoded ``bytes`` or a binary file object) to 8-bit RGB
    through ``to_rgb``; the pixels are read here, so a truncated or corrupt file raises here."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    elif isinstance(source, os.PathLike):
        source = os.fspath(source)
    with Image.open(source) as image:
        image.load()
        return to_rgb(image)


def _field_bytes(key: str, value) -> bytes:
    """A sample field as tar member bytes: bytes as they are, text as UTF-8, an int as its decimal
    digits (``cls``, ``group``), a dict or list as JSON."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).encode()
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    raise TypeError(f"sample field {key!r} is a {type(value).__name__}: give bytes (encoded images), str, int or a dict/list")


def write_shard(path: str, samples) -> int:
    """Write ``samples`` (dicts ``{"__key__": str, "jpg"|"png"|...: bytes, "cls": int, ...}``, see
    ``_field_bytes``) as one webdataset tar shard at ``path``; returns the number written.

    Written with webdataset's ``TarWriter`` through ``data.files.atomic_path`` (a temporary
    ``NAME.partial-PID`` renamed when complete), so ``path`` is either absent or a whole shard (a
    crash never leaves a truncated one). Tar headers use a fixed mtime, so the same samples give
    identical bytes."""
    import webdataset as wds

    count = 0
    with files.atomic_path(path) as partial:
        with wds.TarWriter(partial, encoder=False, mtime=0.0) as sink:
            for sample in samples:
                if "__key__" not in sample:
                    raise ValueError(f"a sample for {path} has no '__key__': {sorted(sample)}")
                sink.write({k: (v if k == "__key__" else _field_bytes(k, v)) for k, v in sample.items()})
                count += 1
    return count


def update_sizes(out_dir: str, prefix: str, sizes: dict) -> dict:
    """Merge ``sizes`` (shard basename → sample count) into ``out_dir/sizes.json``, as OpenCLIP's
    ``get_dataset_size`` reads it: entries of other prefixes already there are kept, stale entries
    of ``prefix`` (shards ``{prefix}-NNNNNN.tar`` not in ``sizes``) are dropped. Read, merged and
    written back under ``data.files.merge_json``'s lock, atomically; returns the merged mapping.
    The one ``sizes.json`` rule of the package (``write_shards`` and make-shards use it)."""
    def merge(old: dict) -> dict:
        kept = {k: v for k, v in old.items() if not (_SHARD_NAME.fullmatch(k) and _SHARD_NAME.fullmatch(k)[1] == prefix)}
        return {**kept, **sizes}
    return files.merge_json(os.path.join(out_dir, "sizes.json"), merge, sort_keys=True)


_SHARD_NAME = re.compile(r"(.*)-(\d+)\.tar")


def write_shards(out_dir: str, samples, *, prefix: str = "shard", samples_per_shard: int = 1000) -> list[str]:
    """Write ``samples`` (an iterable of sample dicts, see ``write_shard``) as shards
    ``out_dir/{prefix}-NNNNNN.tar`` of ``samples_per_shard`` each (the last one may be
    shorter) and ``out_dir/sizes.json``; returns the sorted shard paths."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be ≥ 1, not {samples_per_shard}")
    os.makedirs(out_dir, exist_ok=True)
    paths, sizes = [], {}
    iterator = iter(samples)
    while True:
        chunk = list(itertools.islice(iterator, samples_per_shard))
        if not chunk:
            break
        path = os.path.join(out_dir, f"{prefix}-{len(paths):06d}.tar")
        sizes[os.path.basename(path)] = write_shard(path, chunk)
        paths.append(path)
    update_sizes(out_dir, prefix, sizes)
    return sorted(paths)


def brace_pattern(paths) -> str:
    """Brace pattern for consecutive shards, e.g. ``/dir/shard-{000000..000003}.tar``.

    ``paths`` is a sorted list like ``write_shards`` returns; a single path is returned
    unchanged. A ValueError for names that are not ``PREFIX-NNNN.tar`` or numbers with gaps."""
    paths = list(paths)
    if len(paths) == 1:
        return paths[0]
    matches = [_SHARD_NAME.fullmatch(p) for p in paths]
    if not paths or not all(matches) or len({m[1] for m in matches}) != 1:
        raise ValueError(f"not a shard list from write_shards: {paths}")
    numbers = [int(m[2]) for m in matches]
    if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        raise ValueError(f"shard numbers are not consecutive: {paths}")
    head, first, last = matches[0][1], matches[0][2], matches[-1][2]
    return f"{head}-{{{first}..{last}}}.tar"


class BrokenShard(Exception):
    """A tar shard that cannot be read to its end: truncated (cut inside a header or a member),
    corrupt, or unreadable. ``url``: the shard; ``samples``: complete samples read before the
    damage; ``cause``: what was found. The message is one line naming all three."""

    def __init__(self, url: str, samples: int, cause: str):
        self.url, self.samples, self.cause = url, samples, cause
        super().__init__(f"shard {url} is broken after {samples} complete sample(s): {cause}")


class _TailReader:
    """A binary stream wrapper that counts the bytes read and keeps the last ``keep`` of them, so
    the end of a tar stream can be checked without seeking (works for pipes and remote streams)."""

    def __init__(self, stream, keep: int = 1 << 16):
        self.stream, self.keep, self.total = stream, keep, 0
        self.chunks: collections.deque[bytes] = collections.deque()
        self.kept = 0

    def read(self, size=-1) -> bytes:
        data = self.stream.read(size)
        if data:
            self.total += len(data)
            self.chunks.append(bytes(data))
            self.kept += len(data)
            while self.chunks and self.kept - len(self.chunks[0]) >= self.keep:
                self.kept -= len(self.chunks.popleft())
        return data

    def drain(self) -> None:
        while self.read(1 << 16):
            pass

    def after(self, offset: int) -> bytes | None:
        """The bytes from absolute ``offset`` to the end of the stream (call after ``drain``);
        None when they are no longer kept (more than ``keep`` bytes follow ``offset``)."""
        start = self.total - self.kept
        if offset < start:
            return None
        return b"".join(self.chunks)[offset - start:]


def _shard_member_name(name: str) -> bool:
    """Whether a tar member belongs to a sample (webdataset's rule: ``__meta__`` files are not)."""
    base = name.rsplit("/", 1)[-1]
    return not (base.startswith("__") and base.endswith("__"))


def iter_shard(url: str, stream=None):
    """The samples of one webdataset tar shard, each a dict ``{"__key__", "__url__", ext: bytes}``
    grouped by key as webdataset groups them, checked to the end of the archive.

    Python's ``tarfile`` stops quietly where a tar is cut inside a header (or at a member
    boundary): here the stream must end with the end-of-archive blocks (zero bytes only after
    the last member), else ``BrokenShard`` is raised. A sample is yielded only once the next one
    starts or the end is verified, so a shard cut inside a sample never yields that sample half
    (``BrokenShard.samples`` counts the complete ones yielded). ``stream``: an open binary file
    object for ``url`` (default: webdataset's ``gopen(url)``, local paths, pipes and URLs)."""
    import tarfile

    from webdataset.tariterators import base_plus_ext

    import webdataset as wds

    own = stream is None
    try:
        stream = wds.gopen(url) if own else stream
    except Exception as e:  # noqa: BLE001 - any open failure names the shard
        raise BrokenShard(url, 0, f"cannot open it ({type(e).__name__}: {e})") from e
    reader = _TailReader(stream)
    yielded, current = 0, None
    try:
        try:
            with tarfile.open(fileobj=reader, mode="r|*") as tar:
                for member in tar:
                    if not member.isreg() or not _shard_member_name(member.name):
                        continue
                    key, ext = base_plus_ext(member.name)
                    if key is None:
                        continue
                    ext = ext.lower()
                    if current is None or key != current["__key__"] or ext in current:
                        if current is not None:
                            yield current
                            yielded += 1
                        current = {"__key__": key, "__url__": url}
                    current[ext] = tar.extractfile(member).read()
                end, plain = tar.offset, getattr(tar.fileobj, "comptype", "tar") == "tar"
            if plain:
                reader.drain()
                rest = reader.after(end)
                if rest is None or len(rest) < 512 or rest.count(0) != len(rest):
                    where = "at a member boundary" if rest == b"" else "inside a tar header or with data after the end"
                    raise BrokenShard(url, yielded, f"truncated or corrupt tar (the archive stops {where} at byte "
                                      f"{end} of {reader.total}, without the end-of-archive blocks)")
        except BrokenShard:
            raise
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            raise BrokenShard(url, yielded, f"{type(e).__name__}: {e}") from e
        if current is not None:
            yield current
    finally:
        if own:
            stream.close()
