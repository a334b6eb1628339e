"""Built-in toy dataset with a spurious background correlation (Waterbirds-like).

Each image shows one foreground shape (the class, see ``CLASSNAMES``) drawn on a
noisy textured background (the spurious attribute, see ``BACKGROUNDS``).  In a
*biased* split class ``k`` sits on background ``k`` with probability
``p_spurious`` and on a uniformly random other background otherwise; in a
*balanced* split the background is uniform and independent of the class.  The
group id is ``class_index * len(BACKGROUNDS) + background_index``.

Images are drawn procedurally with PIL + numpy (no downloads) and can be written
as webdataset tar shards (``write_shards``, for ``--train-data``) or as a
tab-separated csv with PNG files (``write_csv``, for ``--csv-*`` loading).
Everything is deterministic given ``seed``: sample ``i`` is drawn from
``numpy.random.default_rng([seed, i])`` and does not depend on the shard layout.
"""

import csv
import io
import math
import os
import random

import numpy as np
from PIL import Image, ImageDraw

from open_clip_starft.data.samples import brace_pattern  # noqa: F401 - the demo's callers build --train-data with it
from open_clip_starft.data.samples import write_shards as _write_shards

CLASSNAMES = ["circle", "square", "triangle", "cross"]
BACKGROUNDS = ["water", "grass", "sand", "snow"]
BACKGROUND_PHRASES = {
    "water": "on the water",
    "grass": "on the grass",
    "sand": "on the sand",
    "snow": "in the snow",
}

# Shape colours (RGB) chosen to stand out from blue / green / tan / white.
_PALETTE = [(215, 35, 35), (240, 125, 20), (200, 45, 170), (105, 45, 160), (25, 25, 25)]
_MAX_ANGLE_DEG = 25.0


def _background(bg, rng, size):
    """Draw background ``bg`` (index into BACKGROUNDS) as a ``size`` x ``size`` RGB image."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size  # in [0, 1)
    noise = rng.normal(0.0, 1.0, (size, size, 1)).astype(np.float32)
    name = BACKGROUNDS[bg]
    if name == "water":  # blue with horizontal, slightly wavy stripes and bright crests
        freq, phase, wobble = rng.uniform(5, 8), rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi)
        wave = np.sin(2 * math.pi * (freq * y + 0.12 * np.sin(2 * math.pi * 2 * x + wobble)) + phase)[..., None]
        arr = np.array([30, 90, 175]) + wave * np.array([18, 28, 35]) + (wave > 0.8) * 55 + 8 * noise
    elif name == "grass":  # green with vertical column streaks and darker / lighter blade strokes
        cols = rng.normal(0.0, 1.0, (1, size, 1))
        arr = np.array([70, 145, 45]) + cols * np.array([8, 18, 6]) + 8 * noise
    elif name == "sand":  # tan with dark and bright speckles
        speck = (rng.random((size, size, 1)) < 0.08) * rng.choice([-55.0, 35.0], (size, size, 1))
        arr = np.array([214, 186, 138]) + speck + 6 * noise
    else:  # snow: near-white with light blue-grey dots
        arr = np.array([242, 245, 250]) + 4 * noise
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    if name == "grass":
        for _ in range(size // 2):
            x0, y0 = rng.uniform(0, size), rng.uniform(0, size)
            length, lean = rng.uniform(0.08, 0.2) * size, rng.uniform(-0.25, 0.25)
            shade = (35, 95, 25) if rng.random() < 0.5 else (120, 190, 80)
            draw.line([(x0, y0), (x0 + lean * length, y0 - length)], fill=shade, width=2)
    elif name == "snow":
        for _ in range(size // 4):
            cx, cy, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(1.5, 4.0)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(170, 185, 208))
    return img


def _shape_vertices(name, d):
    """Polygon vertices (n, 2) of shape ``name`` with extent ``d`` pixels, centred at 0."""
    h = d / 2
    if name == "square":
        return np.array([(-h, -h), (h, -h), (h, h), (-h, h)])
    if name == "triangle":  # equilateral, side d, centred on its centroid
        angles = np.deg2rad([-90, 30, 150])
        return (d / math.sqrt(3)) * np.stack([np.cos(angles), np.sin(angles)], 1)
    t = d / 6  # cross: plus sign with arm thickness d / 3
    return np.array([(-t, -h), (t, -h), (t, -t), (h, -t), (h, t), (t, t),
                     (t, h), (-t, h), (-t, t), (-h, t), (-h, -t), (-t, -t)])


def draw_image(cls, bg, rng, image_size=64):
    """Draw class ``cls`` on background ``bg`` using generator ``rng``.

    Rendered at 2x and downsampled with LANCZOS. The shape has a random palette
    colour, an extent of 35-65 % of the image side, a random rotation of up to
    +-25 degrees (not visible for circles) and a random position fully inside the
    image. The background is drawn first and the same number of random values is
    used for every class, so one ``rng`` state gives the same background and
    placement for all classes. Returns an ``image_size`` x ``image_size`` RGB image.
    """
    size = 2 * image_size
    img = _background(bg, rng, size)
    colour = _PALETTE[rng.integers(len(_PALETTE))]
    d = rng.uniform(0.35, 0.65) * size
    angle = np.deg2rad(rng.uniform(-_MAX_ANGLE_DEG, _MAX_ANGLE_DEG))
    u = rng.random(2)
    draw = ImageDraw.Draw(img)
    if CLASSNAMES[cls] == "circle":
        cx, cy = d / 2 + u * (size - d)
        draw.ellipse([cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2], fill=colour)
    else:
        c, s = math.cos(angle), math.sin(angle)
        verts = _shape_vertices(CLASSNAMES[cls], d) @ np.array([[c, s], [-s, c]])
        lo, hi = -verts.min(0), size - verts.max(0)  # allowed centre range per axis
        verts = verts + lo + u * (hi - lo)
        draw.polygon([tuple(v) for v in verts], fill=colour)
    return img.resize((image_size, image_size), Image.Resampling.LANCZOS)


def render_sample(index, *, seed, biased=True, p_spurious=0.9, image_size=64):
    """Draw sample ``index`` of the split defined by ``seed`` / ``biased`` / ``p_spurious``.

    The class is uniform over CLASSNAMES; the background follows the biased or
    balanced rule from the module docstring. Returns
    ``(image, class_index, background_index)`` with an ``image_size`` px RGB image.
    """
    rng = np.random.default_rng([seed, index])
    n_bg = len(BACKGROUNDS)
    cls = int(rng.integers(len(CLASSNAMES)))
    if not biased:
        bg = int(rng.integers(n_bg))
    elif rng.random() < p_spurious:
        bg = cls % n_bg
    else:
        bg = int((cls + 1 + rng.integers(n_bg - 1)) % n_bg)
    return draw_image(cls, bg, rng, image_size), cls, bg


def caption(cls, bg):
    """Caption for class ``cls`` on background ``bg``, e.g. "a photo of a circle on the water."."""
    return f"a photo of a {CLASSNAMES[cls]} {BACKGROUND_PHRASES[BACKGROUNDS[bg]]}."


def pretrain_caption(seed, p_background):
    """Captions for pre-training (a ``caption_fn`` of ``write_shards``): "a photo of a circle." for
    most samples, ``caption(cls, bg)`` (the background named too) for a ``p_background`` share,
    decided per sample index from ``seed``."""
    def text(i, cls, bg):
        if random.Random(hash((seed, i))).random() < p_background:
            return caption(cls, bg)
        return f"a photo of a {CLASSNAMES[cls]}."
    return text


def group_id(cls, bg):
    """Group id ``cls * len(BACKGROUNDS) + bg`` in ``[0, len(CLASSNAMES) * len(BACKGROUNDS))``."""
    return cls * len(BACKGROUNDS) + bg


def write_shards(out_dir, n_samples, *, seed, biased=True, p_spurious=0.9, image_size=64,
                 samples_per_shard=64, prefix="shard", caption_fn=None):
    """Write ``n_samples`` samples as webdataset shards ``out_dir/{prefix}-NNNNNN.tar``.

    Each sample has ``__key__`` ``sNNNNNN`` (global index), ``jpg`` (JPEG, quality
    90), ``cls`` (class index), ``group`` (group id) and ``txt`` (caption). Tar
    headers use a fixed mtime, so reruns produce identical files. ``out_dir/sizes.json``
    maps each shard basename to its sample count (entries of other prefixes already
    in it are kept), as read by ``open_clip_train.data.get_dataset_size``.
    ``caption_fn(index, cls, bg) -> str`` replaces ``caption(cls, bg)`` as the ``txt`` field.
    Returns the sorted list of shard paths (written by ``data.samples.write_shards``).
    """
    def samples():
        for i in range(n_samples):
            img, cls, bg = render_sample(i, seed=seed, biased=biased, p_spurious=p_spurious, image_size=image_size)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            yield {"__key__": f"s{i:06d}", "jpg": buf.getvalue(), "cls": cls, "group": group_id(cls, bg),
                   "txt": caption_fn(i, cls, bg) if caption_fn else caption(cls, bg)}
    return _write_shards(out_dir, samples(), prefix=prefix, samples_per_shard=samples_per_shard)


def write_csv(out_dir, n_samples, *, seed, biased=True, p_spurious=0.9, image_size=64):
    """Write ``n_samples`` PNGs to ``out_dir/images/`` and a tab-separated ``out_dir/data.csv``.

    Columns: ``filepath`` (absolute path), ``label`` (class index), ``group``
    (group id), ``title`` (caption). Returns the csv path.
    """
    img_dir = os.path.abspath(os.path.join(out_dir, "images"))
    os.makedirs(img_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "data.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["filepath", "label", "group", "title"])
        for i in range(n_samples):
            img, cls, bg = render_sample(i, seed=seed, biased=biased, p_spurious=p_spurious,
                                         image_size=image_size)
            path = os.path.join(img_dir, f"{i:06d}.png")
            img.save(path)
            writer.writerow([path, cls, group_id(cls, bg), caption(cls, bg)])
    return csv_path


# ---------------------------------------------------------------------------------------------------------------
# The transfer design (the demo's protocol since issue 27): pre-train on everything, fine-tune on a SOURCE task,
# score a TARGET task zero-shot that the fine-tune never saw.
#
# An object has a shape (SHAPES), a colour (COLOURS), a fill pattern (PATTERNS) and a background (BACKGROUNDS).
# - pre-training: every colour, shape, pattern and background; captions name the shape, often its colour, sometimes
#   its background, never its pattern (``transfer_caption``);
# - source task: classes "pattern shape" (``SOURCE_CLASSNAMES``, 12) in the source colours only; each shape sits on
#   its own background (shape k on background k) with probability ``p_spurious``: a shortcut for the shape, while
#   the pattern (drawn in pre-training, never named) is what the fine-tune must learn;
# - target task: classes "shape" (``SHAPES``), plain objects in the held-out colours only, every background equally
#   likely, group = shape × background. No target colour is ever drawn in a source image.
# ---------------------------------------------------------------------------------------------------------------

SHAPES = CLASSNAMES  # the target's classes: circle, square, triangle, cross
COLOURS = {"red": _PALETTE[0], "orange": _PALETTE[1], "pink": _PALETTE[2], "purple": _PALETTE[3],
           "black": _PALETTE[4]}
PATTERNS = ["plain", "striped", "dotted"]
SOURCE_CLASSNAMES = [f"{pattern} {shape}" for shape in SHAPES for pattern in PATTERNS]  # id = shape * 3 + pattern
TRANSFER_PARTS = ("pretrain", "source", "target")


def _fill(colour, pattern, rng, size):
    """The ``size`` px fill of an object: its colour, with light stripes (random angle, period 8 px at the 2x
    canvas) or a light dot grid for the patterns. Returns an RGB image."""
    fill = np.empty((size, size, 3), np.float32)
    fill[:] = colour
    light = 0.35 * np.array(colour, np.float32) + 0.65 * 255.0
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    if pattern == "striped":
        theta, phase = rng.uniform(0, math.pi), rng.uniform(0, 8)
        across = x * math.cos(theta) + y * math.sin(theta) + phase
        fill[(across % 8) < 4] = light
    elif pattern == "dotted":
        ox, oy = rng.uniform(0, 8, 2)
        dx, dy = (x + ox) % 8 - 4, (y + oy) % 8 - 4
        fill[dx * dx + dy * dy < 4.0] = light
    return Image.fromarray(fill.astype(np.uint8), "RGB")


def draw_object(shape, bg, colour, pattern, rng, image_size=32):
    """Shape ``shape`` (index into SHAPES) in ``colour`` (a COLOURS name) with fill ``pattern`` (a PATTERNS name)
    on background ``bg``, drawn like ``draw_image`` (2x canvas, 35-65 % extent, rotation up to ±25°, fully
    inside, LANCZOS down to ``image_size`` px). Returns an RGB image."""
    size = 2 * image_size
    img = _background(bg, rng, size)
    d = rng.uniform(0.35, 0.65) * size
    angle = np.deg2rad(rng.uniform(-_MAX_ANGLE_DEG, _MAX_ANGLE_DEG))
    u = rng.random(2)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if SHAPES[shape] == "circle":
        cx, cy = d / 2 + u * (size - d)
        draw.ellipse([cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2], fill=255)
    else:
        c, s = math.cos(angle), math.sin(angle)
        verts = _shape_vertices(SHAPES[shape], d) @ np.array([[c, s], [-s, c]])
        lo, hi = -verts.min(0), size - verts.max(0)
        verts = verts + lo + u * (hi - lo)
        draw.polygon([tuple(v) for v in verts], fill=255)
    img.paste(_fill(COLOURS[colour], pattern, rng, size), (0, 0), mask)
    return img.resize((image_size, image_size), Image.Resampling.LANCZOS)


def transfer_caption(shape, colour, bg, *, name_colour, name_background):
    """A pre-training caption: "a photo of a [colour] shape[ background phrase]." (the pattern is never named)."""
    words = f"{colour} {SHAPES[shape]}" if name_colour else SHAPES[shape]
    where = f" {BACKGROUND_PHRASES[BACKGROUNDS[bg]]}" if name_background else ""
    return f"a photo of a {words}{where}."


def render_transfer_sample(index, *, seed, part, design):
    """Sample ``index`` of part ``part`` (``TRANSFER_PARTS``) drawn from ``numpy.random.default_rng([seed, index])``.

    ``design`` holds ``source_colours`` and ``target_colours`` (disjoint COLOURS names), ``p_spurious`` (source
    images on their shape's background), ``p_plain`` (plain pre-training objects; the rest striped or dotted
    equally), ``p_colour`` / ``p_background`` (pre-training captions naming the colour / the background) and
    ``image_size``. Returns ``(image, fields)``: ``fields`` has ``cls`` (pre-training: the shape; source: the
    ``SOURCE_CLASSNAMES`` id; target: the shape), ``group`` (``cls * len(BACKGROUNDS) + bg``), ``txt`` and
    ``attributes`` (shape, colour, pattern, background names)."""
    if set(design["source_colours"]) & set(design["target_colours"]):
        raise ValueError(f"source and target colours overlap: {design['source_colours']} / {design['target_colours']}")
    rng = np.random.default_rng([seed, index])
    n_bg = len(BACKGROUNDS)
    shape = int(rng.integers(len(SHAPES)))
    if part == "pretrain":
        colours = list(COLOURS)
        pattern = "plain" if rng.random() < design["p_plain"] else PATTERNS[1 + int(rng.integers(2))]
        bg = int(rng.integers(n_bg))
    elif part == "source":
        colours = design["source_colours"]
        pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
        bg = shape % n_bg if rng.random() < design["p_spurious"] else int((shape + 1 + rng.integers(n_bg - 1)) % n_bg)
    elif part == "target":
        colours, pattern, bg = design["target_colours"], "plain", int(rng.integers(n_bg))
    else:
        raise ValueError(f"unknown part {part!r}: use one of {TRANSFER_PARTS}")
    colour = colours[int(rng.integers(len(colours)))]
    naming = rng.random(2)  # drawn for every part, so the image does not depend on the captions' shares
    image = draw_object(shape, bg, colour, pattern, rng, design["image_size"])
    if part == "source":
        cls = shape * len(PATTERNS) + PATTERNS.index(pattern)
        txt = f"a photo of a {SOURCE_CLASSNAMES[cls]}."
    else:
        cls = shape
        txt = transfer_caption(shape, colour, bg, name_colour=part == "pretrain" and naming[0] < design["p_colour"],
                               name_background=part == "pretrain" and naming[1] < design["p_background"])
    attributes = {"shape": SHAPES[shape], "colour": colour, "pattern": pattern, "background": BACKGROUNDS[bg]}
    return image, {"cls": cls, "group": cls * n_bg + bg, "txt": txt, "attributes": attributes}


def write_transfer_shards(out_dir, n_samples, *, seed, part, design, samples_per_shard=256, prefix="shard"):
    """Write ``n_samples`` samples of ``part`` as webdataset shards ``out_dir/{prefix}-NNNNNN.tar``: ``jpg``
    (quality 90), ``cls``, ``group``, ``txt`` and ``json`` (the attributes), fixed tar mtimes, ``sizes.json``
    (``data.samples.write_shards``). Returns the sorted shard paths."""
    def samples():
        for i in range(n_samples):
            img, fields = render_transfer_sample(i, seed=seed, part=part, design=design)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            yield {"__key__": f"s{i:06d}", "jpg": buf.getvalue(), "cls": fields["cls"], "group": fields["group"],
                   "txt": fields["txt"], "json": fields["attributes"]}
    return _write_shards(out_dir, samples(), prefix=prefix, samples_per_shard=samples_per_shard)
