"""Waterbirds-lite data: real photographic cut-outs pasted on real scene photographs.

Material, all from Debian packages (``PACKAGES``): the photographic stamps of Tux Paint
(``tuxpaint-stamps-default``: objects and ~35 birds with alpha masks) and landscape photographs
(Tux Paint's templates and five wallpaper packages). ``labels.json`` (beside this file, made by
looking at every image) says which birds live on water and which on land, each bird's species
(``species``, where several stamps show one species: duck / domestic duck, peacock / white
peafowl, chicken / rooster / hen, ...), which scenes are water and which land, each scene's
caption phrase ("on the beach"), and each object's natural place.

A sample is a random crop of a scene (resized to ``image_size``) with one cut-out pasted at a
random scale, position and flip. Everything is deterministic from the seeds: sample ``i`` of a
set is drawn from ``numpy.random.default_rng([seed, set_id, i])``.

Splits (``{variant}-s{seed}``):

- ``crops`` (the headline): every bird species and every scene photograph in every part; the parts are
  different random crops and pastes (their own sample seeds). Like Waterbirds' Places backgrounds for CLIP,
  the backgrounds are in-distribution for the zero-shot model; the test shifts only the bird-background
  pairing (95 % aligned in training data, balanced at test). Pre-training saw other crops of the test
  photographs: the docs say so.
- ``shared`` (v3's headline, the faithful analogue of Waterbirds: CUB's species appear in every split, only the
  backgrounds shift): every bird species in every part, scene photographs split 50/20/30 % within each place,
  so no validation or test photograph appears in pre-training, Waterbirds-lite train or P1's source-train
  (source-val and source-test use the val and test photographs). With 9 water photographs, validation gets 2
  and test 3. v2's from-scratch image tower did not reach 75 % on validation here; v3's pretrained one is
  probed in the study's notes. The manifest lists every photograph with its package, place and part.
- ``identity``: bird SPECIES split 50/20/30 % within each kind (all stamps of a species on one side),
  scene photographs split as in ``shared``.
- ``transfer`` (the paper's protocol: fine-tune on a source task, zero-shot on a task whose material the fine-tune
  never saw): bird SPECIES split about half and half within each kind into SOURCE species (the ``train`` part) and
  TARGET species (the ``val`` and ``test`` parts), scene photographs split as in ``shared``. Pre-training shows
  every species, each bird on a uniformly drawn place (so the zero-shot model starts robust); every fine-tuning set
  (``source-*``, ``wb-train``) shows source species only, so no target cut-out is in any fine-tune; ``wb-val`` and
  ``wb-test`` show target species only, balanced over the four groups.

Tux Paint has one cut-out per species for most species, so in ``crops`` and ``shared`` the bird cut-outs
themselves are shared between parts.

Sets written per split (webdataset shards with ``jpg``, ``cls``, ``group``, ``txt``;
``classnames.txt`` and ``sizes.json`` beside them; ``manifest.json`` at the top):

- ``pretrain``: the split's own pre-training set, on its TRAIN scene photographs only (in ``crops``: every
  photograph, its own crops): objects and the train-part birds (a bird in ``p_pretrain_bird`` of the
  images), each on its natural place with probability ``p_pretrain_natural`` (web photographs are biased
  too). The class is a caption body ("duck", "duck on the beach"; for birds also "waterbird, a duck",
  "waterbird", each with the scene or not, naming the superclass in ``p_pretrain_superclass`` of bird
  captions), so a contrastive run through ``open_clip_starft.main`` with ``--starft-lambda 0`` and
  template ``a photo of a {}.`` learns objects, birds and superclasses;
- ``wb-train`` (95 % waterbirds on water and landbirds on land), ``wb-val``, ``wb-test`` (balanced
  over the four groups; group = 2·label + place, as Waterbirds);
- ``source-train``, ``source-val``, ``source-test`` (the ImageNet stand-in of protocol P1, a
  multi-class task: the source object classes, each on a scene of its natural place 80 % of the
  time, and the train-part bird species, named by species, on their own place 95 % of the time;
  val/test on the val/test scene photographs with the same biases: source-val chooses P1's
  fine-tune schedule, source-test is P1's in-distribution accuracy);
- ``heldout-test`` (the other object classes, uniform scenes: retained zero-shot).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps

from open_clip_starft.data.files import write_json, write_text
from open_clip_starft.data.samples import brace_pattern, write_shards
from open_clip_starft.errors import DataError, StarftError
from open_clip_starft.eval.progress import Progress

PACKAGES = ("tuxpaint-stamps-default", "tuxpaint-data", "plasma-workspace-wallpapers", "mate-backgrounds",
            "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04")
STAMPS_ROOT = "/usr/share/tuxpaint/stamps"
LABELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "labels.json")
PLACES = ("land", "water")
WB_CLASSNAMES = ("landbird", "waterbird")
WB_GROUP_NAMES = ("landbird on land", "landbird on water", "waterbird on land", "waterbird on water")
SPLIT_FRACTIONS = {"train": 0.5, "val": 0.2, "test": 0.3}
VARIANTS = ("shared", "identity", "crops", "transfer")  # the index is in the data seed: append, never reorder
# of the manifest and its sets: v1 (commit 83bb42d) had one pre-training set for all splits; v2 had no ``stamp``
# field in its samples and no ``pretrain`` part of the birds
VERSION = 3
FINETUNE_SETS = ("wb-train", "source-train", "source-val", "source-test")  # the sets a fine-tune or its choice reads
# the sets' ids in the sample seeds (never reuse one)
SET_IDS = {"pretrain": 1, "wb-train": 2, "wb-val": 3, "wb-test": 4, "source-train": 5, "heldout-test": 6,
           "source-val": 7, "source-test": 8}


@dataclass(frozen=True)
class Stamp:
    file: str    # relative to STAMPS_ROOT
    name: str    # class name ("duck")
    kind: str    # waterbird | landbird | object
    place: str   # where it naturally is: land | water
    species: str = ""  # birds: the species several stamps may share ("duck" for "domestic duck"); default: name

    @property
    def group(self) -> str:
        """What a split keeps on one side: the species of a bird, the name of anything else."""
        return self.species or self.name


@dataclass(frozen=True)
class Scene:
    package: str
    file: str    # absolute path
    place: str   # land | water
    phrase: str  # "on the beach"


@dataclass
class Sizes:
    """Sample counts per set and the image size (pixels)."""
    image_size: int = 64
    pretrain: int = 16000          # per split (each split pre-trains its own zero-shot models)
    wb_train: int = 1200
    wb_val: int = 400
    wb_test: int = 1000
    source_train: int = 3000
    source_val: int = 600
    source_test: int = 1000
    heldout_test: int = 800
    source_fraction: float = 0.6  # share of the object classes that form the source task
    p_aligned: float = 0.95       # wb-train and the source task's birds: share on their own place
    p_natural: float = 0.8        # source task's objects: share on their natural place
    p_pretrain_natural: float = 0.8  # pre-training: share of stamps on their natural place
    p_pretrain_bird: float = 0.7     # pre-training: share of samples that show a bird (the rest: objects)
    p_pretrain_superclass: float = 0.8  # pre-training: share of bird captions that name the superclass


# -- material ------------------------------------------------------------------------------------
def missing_packages(packages=PACKAGES) -> list[str]:
    """The Debian packages of ``packages`` that are not installed (all of them where dpkg is absent)."""
    if shutil.which("dpkg-query") is None:
        return list(packages)
    missing = []
    for p in packages:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True)
        if out.returncode != 0 or "install ok installed" not in out.stdout:
            missing.append(p)
    return missing


def ensure_packages(packages=PACKAGES, install: bool = False) -> None:
    """Check that the Debian packages are installed. Missing ones: a one-line ``DataError`` naming them and the
    command that installs them; ``install=True`` (asked for explicitly) runs that command with apt-get instead."""
    missing = missing_packages(packages)
    if not missing:
        return
    command = f"apt-get install -y {' '.join(missing)}"
    if not install:
        raise DataError(f"Waterbirds-lite needs Debian packages that are not installed; install them as root: {command}")
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise DataError(f"Waterbirds-lite needs the Debian packages {', '.join(missing)}, which cannot be installed "
                        f"here ({'no apt-get' if shutil.which('apt-get') is None else 'not root'}): run {command} as root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    result = subprocess.run(["apt-get", "install", "-y", "-qq", *missing], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env)
        result = subprocess.run(["apt-get", "install", "-y", "-qq", *missing], capture_output=True, text=True, env=env)
    still = missing_packages(missing)
    if result.returncode != 0 or still:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"Waterbirds-lite: apt-get could not install {', '.join(still or missing)} ({last}): "
                        f"run {command} as root")


def load_labels(path: str = LABELS) -> tuple[list[Stamp], list[Scene]]:
    """The labelled stamps and scenes of ``labels.json``; a one-line error for a file that is not there."""
    with open(path) as f:
        data = json.load(f)
    stamps = [Stamp(s["file"], s["name"], s["kind"], s["place"], s.get("species", "")) for s in data["stamps"]]
    scenes = [Scene(s["package"], s["file"], s["place"], s["phrase"]) for s in data["scenes"]]
    for s in stamps:
        if not os.path.exists(os.path.join(STAMPS_ROOT, s.file)):
            raise StarftError(f"stamp {s.file!r} of {path} is not in {STAMPS_ROOT}: reinstall tuxpaint-stamps-default")
    for s in scenes:
        if not os.path.exists(s.file):
            raise StarftError(f"scene {s.file!r} of {path} does not exist: reinstall {s.package}")
    return stamps, scenes


class Material:
    """The stamps (RGBA, cropped to their mask) and scenes (RGB), decoded once at working sizes."""

    def __init__(self, stamps: list[Stamp], scenes: list[Scene], image_size: int):
        self.image_size = image_size
        self.stamps, self.scenes = stamps, scenes
        self.stamp_images = [self._stamp(os.path.join(STAMPS_ROOT, s.file)) for s in stamps]
        self.scene_images = [self._scene(s.file) for s in scenes]

    def _stamp(self, path: str) -> Image.Image:
        img = Image.open(path).convert("RGBA")
        box = img.getchannel("A").point(lambda a: 255 if a > 16 else 0).getbbox()
        if box is None:
            raise StarftError(f"stamp {path!r} has an empty alpha mask: drop it from labels.json")
        img = img.crop(box)
        img.thumbnail((2 * self.image_size, 2 * self.image_size), Image.LANCZOS)
        return img

    def _scene(self, path: str) -> Image.Image:
        img = Image.open(path).convert("RGB")
        short = 3 * self.image_size  # room for crops at several scales
        scale = short / min(img.size)
        return img.resize((max(short, round(img.width * scale)), max(short, round(img.height * scale))), Image.LANCZOS)

    def compose(self, stamp: int, scene: int, rng: np.random.Generator) -> Image.Image:
        """Cut-out ``stamp`` at a random scale, flip and position on a random crop of ``scene``."""
        size = self.image_size
        bg = self.scene_images[scene]
        side = int(rng.uniform(0.5, 1.0) * min(bg.size))
        x, y = int(rng.integers(0, bg.width - side + 1)), int(rng.integers(0, bg.height - side + 1))
        canvas = bg.crop((x, y, x + side, y + side)).resize((size, size), Image.BILINEAR)
        fg = self.stamp_images[stamp]
        longest = rng.uniform(0.5, 0.85) * size
        scale = longest / max(fg.size)
        fg = fg.resize((max(1, round(fg.width * scale)), max(1, round(fg.height * scale))), Image.LANCZOS)
        if rng.random() < 0.5:
            fg = ImageOps.mirror(fg)
        px, py = int(rng.integers(0, size - fg.width + 1)), int(rng.integers(0, size - fg.height + 1))
        canvas.paste(fg, (px, py), fg)
        return canvas


# -- splits --------------------------------------------------------------------------------------
def _split(indices: list[int], seed: int, what: str) -> dict[str, list[int]]:
    """``indices`` shuffled by ``seed`` and cut 50/20/30 % into train/val/test; none may be empty."""
    order = list(np.random.default_rng(seed).permutation(indices))
    n = len(order)
    n_train, n_val = round(n * SPLIT_FRACTIONS["train"]), round(n * SPLIT_FRACTIONS["val"])
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return _checked(parts, n, what)


def _source_target(indices: list[int], seed: int, what: str) -> dict[str, list[int]]:
    """``indices`` shuffled by ``seed`` and cut in half (the larger half to the source): ``train`` the source,
    ``val`` and ``test`` both the target (``transfer``: validation and test differ by photographs, not species)."""
    order = list(np.random.default_rng(seed).permutation(indices))
    n_source = (len(order) + 1) // 2
    return _checked({"train": order[:n_source], "val": order[n_source:], "test": order[n_source:]}, len(order), what)


def _checked(parts: dict, n: int, what: str) -> dict[str, list[int]]:
    """``parts`` as int lists; a one-line error naming ``what`` when one is empty."""
    empty = [k for k, v in parts.items() if not v]
    if empty:
        raise StarftError(f"Waterbirds-lite: the {empty[0]} split of the {what} would be empty ({n} in all): "
                          "label more of them in labels.json or use the shared split")
    return {k: [int(i) for i in v] for k, v in parts.items()}


def bird_species(stamps: list[Stamp], kind: str) -> dict[str, list[int]]:
    """``{species: [stamp index, ...]}`` of the birds of ``kind``, in first-appearance order."""
    out: dict[str, list[int]] = {}
    for i, s in enumerate(stamps):
        if s.kind == kind:
            out.setdefault(s.group, []).append(i)
    return out


def make_split(stamps: list[Stamp], scenes: list[Scene], variant: str, seed: int, source_fraction: float) -> dict:
    """Which scenes, birds and object classes each part of split ``{variant}-s{seed}`` uses (indices).
    ``identity`` splits bird species (every stamp of a species on one side), ``transfer`` splits them into source
    (``train``) and target (``val`` and ``test``) halves, ``shared`` and ``crops`` keep every species in every part;
    each kind's ``pretrain`` part is its ``train`` part but in ``transfer``, where pre-training shows every species; scene photographs are split in ``shared`` and ``identity``, while in ``crops`` every
    part draws its own random crops of every photograph (the background photographs, not their crops, are
    shared, as Waterbirds' Places backgrounds are in-distribution for CLIP)."""
    if variant not in VARIANTS:
        raise StarftError(f"unknown split variant {variant!r}: use crops (species and photographs in every part), "
                          "shared (species in every part, photographs split), identity (species split) or transfer "
                          "(source and target species)")
    split = {"name": f"{variant}-s{seed}", "variant": variant, "seed": seed, "scenes": {}, "birds": {}}
    for place in PLACES:
        at_place = [i for i, s in enumerate(scenes) if s.place == place]
        split["scenes"][place] = (_split(at_place, seed * 7 + 1, f"{place} scenes") if variant != "crops" else
                                  {part: at_place for part in SPLIT_FRACTIONS})
    for kind in ("landbird", "waterbird"):
        species = bird_species(stamps, kind)
        if not species:
            raise StarftError(f"Waterbirds-lite: labels.json has no {kind}: label at least one")
        if variant == "identity":
            names = list(species)
            parts = _split(list(range(len(names))), seed * 7 + 2, f"{kind} species")
            split["birds"][kind] = {k: [i for n in v for i in species[names[n]]] for k, v in parts.items()}
        elif variant == "transfer":
            names = list(species)
            parts = _source_target(list(range(len(names))), seed * 7 + 4, f"{kind} species")
            split["birds"][kind] = {k: [i for n in v for i in species[names[n]]] for k, v in parts.items()}
        else:
            split["birds"][kind] = {k: [i for v in species.values() for i in v] for k in SPLIT_FRACTIONS}
        every = sorted(i for v in species.values() for i in v)
        split["birds"][kind]["pretrain"] = every if variant == "transfer" else split["birds"][kind]["train"]
    objects = [i for i, s in enumerate(stamps) if s.kind == "object"]
    order = [int(i) for i in np.random.default_rng(seed * 7 + 3).permutation(objects)]
    n_source = round(len(order) * source_fraction)
    if not 2 <= n_source <= len(order) - 2:
        raise StarftError(f"Waterbirds-lite: {len(order)} object stamps cannot make a source task and held-out "
                          f"classes with source_fraction {source_fraction}: label more objects")
    split["source_classes"] = sorted(order[:n_source], key=lambda i: stamps[i].name)
    split["heldout_classes"] = sorted(order[n_source:], key=lambda i: stamps[i].name)
    return split


# -- writing -------------------------------------------------------------------------------------
def _write_set(out_dir: str, n: int, draw, classnames: list[str], material: Material, seed: int, set_id: int,
               samples_per_shard: int = 500) -> dict:
    """Shards of ``n`` samples, ``draw(rng) -> (stamp, scene, cls, group, caption)``, through
    ``data.samples.write_shards``; returns counts. Each sample names its cut-out (``stamp.txt``: its file under
    ``STAMPS_ROOT``), so what a set shows can be checked on the written shards."""
    groups = {}

    def samples():
        for i in range(n):
            rng = np.random.default_rng([seed, set_id, i])
            stamp, scene, cls, group, caption = draw(rng)
            buf = io.BytesIO()
            material.compose(stamp, scene, rng).save(buf, format="JPEG", quality=90)
            groups[group] = groups.get(group, 0) + 1
            yield {"__key__": f"s{i:06d}", "jpg": buf.getvalue(), "cls": cls, "group": group,
                   "txt": f"a photo of a {caption}.", "stamp.txt": material.stamps[stamp].file}

    paths = write_shards(out_dir, samples(), prefix=os.path.basename(out_dir), samples_per_shard=samples_per_shard)
    write_text(os.path.join(out_dir, "classnames.txt"), "\n".join(classnames) + "\n")
    return {"samples": n, "groups": {str(k): v for k, v in sorted(groups.items())}, "pattern": brace_pattern(paths)}


def _counted(draw, progress):
    """``draw``, with one unit of ``progress`` (an ``eval.progress.Progress`` or None) per image drawn."""
    if progress is None:
        return draw

    def counted(rng):
        progress.update(1)
        return draw(rng)
    return counted


def _place(natural: str, p_natural: float | None, rng: np.random.Generator) -> str:
    """``natural`` with probability ``p_natural``, else the other place; uniform for None."""
    if p_natural is None:
        return PLACES[int(rng.integers(2))]
    return natural if rng.random() < p_natural else PLACES[1 - PLACES.index(natural)]


def pretrain_captions(stamp: Stamp, phrases: list[str]) -> list[str]:
    """The caption bodies of ``stamp`` in pre-training: its names alone, then each with each scene phrase.
    An object has one name ("chair"); a bird three: its species, its superclass with the species ("waterbird,
    a duck") and its superclass alone ("waterbird"), as web captions name a bird at either level."""
    names = [stamp.name] + ([f"{stamp.kind}, a {stamp.name}", stamp.kind] if stamp.kind != "object" else [])
    return names + [f"{n} {p}" for n in names for p in phrases]


def write_pretrain(root: str, material: Material, split: dict, sizes: Sizes, seed: int, progress=None) -> dict:
    """The split's pre-training set under ``root/pretrain``: every object and the split's pretrain-part birds
    (train-part; in ``transfer`` every bird) on its train scene photographs, each stamp on its natural place with
    probability ``sizes.p_pretrain_natural`` (in ``transfer`` a bird's place is uniform: balanced placement).
    A sample shows a bird with probability ``sizes.p_pretrain_bird`` (uniform over the train-part bird stamps),
    else an object (uniform over objects); one caption body per sample from ``pretrain_captions`` (class = its
    index): a bird's names its superclass with probability ``sizes.p_pretrain_superclass`` (with its species or
    alone, equally often), and half of all captions name the scene (its own phrase)."""
    stamps, scenes = material.stamps, material.scenes
    phrases = sorted({s.phrase for s in scenes})
    birds = sorted(split["birds"]["landbird"]["pretrain"] + split["birds"]["waterbird"]["pretrain"])
    bird_natural = None if split["variant"] == "transfer" else sizes.p_pretrain_natural
    objects = [i for i, s in enumerate(stamps) if s.kind == "object"]
    chosen = sorted(objects + birds)
    names, first = [], {}
    for i in chosen:
        first[i] = len(names)
        names += pretrain_captions(stamps[i], phrases)

    def draw(rng):
        pool_of_stamps = birds if rng.random() < sizes.p_pretrain_bird else objects
        stamp = pool_of_stamps[int(rng.integers(len(pool_of_stamps)))]
        place = _place(stamps[stamp].place, sizes.p_pretrain_natural if stamps[stamp].kind == "object" else
                       bird_natural, rng)
        pool = split["scenes"][place]["train"]
        scene = pool[int(rng.integers(len(pool)))]
        n_names = 3 if stamps[stamp].kind != "object" else 1
        # a bird's caption names its superclass (names 1 and 2, equally often) with p_pretrain_superclass
        which = 0 if n_names == 1 or rng.random() >= sizes.p_pretrain_superclass else 1 + int(rng.integers(2))
        if rng.random() < 0.5:
            offset = n_names + which * len(phrases) + phrases.index(scenes[scene].phrase)
        else:
            offset = which
        return stamp, scene, first[stamp] + offset, PLACES.index(place), names[first[stamp] + offset]
    return _write_set(os.path.join(root, "pretrain"), sizes.pretrain, _counted(draw, progress), names, material, seed,
                      SET_IDS["pretrain"])


def source_classes(stamps: list[Stamp], split: dict) -> list[tuple[str, list[int], str]]:
    """P1's source task: ``(class name, stamp indices, kind)`` of the source objects, then of the train-part
    bird species (a species' stamps form one class, named by the species)."""
    classes = [(stamps[i].name, [i], "object") for i in split["source_classes"]]
    for kind in ("landbird", "waterbird"):
        species: dict[str, list[int]] = {}
        for i in split["birds"][kind]["train"]:
            species.setdefault(stamps[i].group, []).append(i)
        classes += [(name, idx, kind) for name, idx in sorted(species.items())]
    return classes


def write_split(out: str, material: Material, split: dict, sizes: Sizes, seed: int, progress=None) -> dict:
    """The sets of one split under ``out/{split name}``; returns their counts and patterns.
    ``progress``: one unit per image."""
    stamps, scenes = material.stamps, material.scenes
    root = os.path.join(out, split["name"])
    sets = {"pretrain": write_pretrain(root, material, split, sizes, seed, progress)}

    def birds_on(part: str, balanced: bool):
        def draw(rng):
            label = int(rng.integers(2))
            place = (int(rng.integers(2)) if balanced else
                     (label if rng.random() < sizes.p_aligned else 1 - label))
            birds = split["birds"][WB_CLASSNAMES[label]][part]
            pool = split["scenes"][PLACES[place]][part]
            stamp, scene = birds[int(rng.integers(len(birds)))], pool[int(rng.integers(len(pool)))]
            return stamp, scene, label, 2 * label + place, f"{WB_CLASSNAMES[label]} {scenes[scene].phrase}"
        return draw

    for part, n, balanced in (("train", sizes.wb_train, False), ("val", sizes.wb_val, True), ("test", sizes.wb_test, True)):
        sets[f"wb-{part}"] = _write_set(os.path.join(root, f"wb-{part}"), n, _counted(birds_on(part, balanced), progress),
                                        list(WB_CLASSNAMES), material, seed, SET_IDS[f"wb-{part}"])

    def stamps_on(classes: list[tuple[str, list[int], str]], part: str, biased: bool):
        def draw(rng):
            cls = int(rng.integers(len(classes)))
            name, members, kind = classes[cls]
            stamp = members[int(rng.integers(len(members)))]
            p = (sizes.p_natural if kind == "object" else sizes.p_aligned) if biased else None
            place = _place(stamps[stamp].place, p, rng)
            pool = split["scenes"][place][part]
            scene = pool[int(rng.integers(len(pool)))]
            return stamp, scene, cls, PLACES.index(place), name
        return draw

    source = source_classes(stamps, split)
    for part, n in (("train", sizes.source_train), ("val", sizes.source_val), ("test", sizes.source_test)):
        sets[f"source-{part}"] = _write_set(os.path.join(root, f"source-{part}"), n,
                                            _counted(stamps_on(source, part, True), progress),
                                            [c[0] for c in source], material, seed, SET_IDS[f"source-{part}"])
    heldout = [(stamps[i].name, [i], "object") for i in split["heldout_classes"]]
    sets["heldout-test"] = _write_set(os.path.join(root, "heldout-test"), sizes.heldout_test,
                                      _counted(stamps_on(heldout, "test", False), progress),
                                      [c[0] for c in heldout], material, seed, SET_IDS["heldout-test"])
    return sets


def photographs(scenes: list[Scene], split: dict) -> list[dict]:
    """Every scene photograph of ``split`` with its Debian package, place and the parts that use it: ``train``
    (pre-training, Waterbirds-lite train, P1's source-train), ``val`` (wb-val, source-val) or ``test`` (wb-test,
    source-test, held-out classes). In ``shared`` and ``identity`` each photograph has one part; in ``crops``
    every photograph has all three."""
    out = []
    for i, scene in enumerate(scenes):
        parts = [part for part in SPLIT_FRACTIONS if i in split["scenes"][scene.place][part]]
        out.append({"file": scene.file, "package": scene.package, "place": scene.place, "phrase": scene.phrase,
                    "parts": parts})
    return out


def set_sizes(sizes: Sizes) -> int:
    """Images written per split."""
    return (sizes.pretrain + sizes.wb_train + sizes.wb_val + sizes.wb_test + sizes.source_train + sizes.source_val
            + sizes.source_test + sizes.heldout_test)


def build(out: str, splits: list[tuple[str, int]], sizes: Sizes = Sizes(), seed: int = 0, install: bool = False,
          labels: str = LABELS, log=print) -> dict:
    """Write every split's sets under ``out`` (a split already in ``out/manifest.json`` with the same sizes and
    seed is kept); returns (and writes) the manifest. Missing Debian packages: a one-line error, or installed
    with apt-get when ``install`` (never by default)."""
    ensure_packages(install=install)
    stamps, scenes = load_labels(labels)
    for place in PLACES:
        if not any(s.place == place for s in scenes):
            raise StarftError(f"Waterbirds-lite: labels.json has no {place} scene: label at least three")
    path = os.path.join(out, "manifest.json")
    manifest = {"version": VERSION, "sizes": asdict(sizes), "seed": seed, "packages": {p: _version(p) for p in PACKAGES},
                "stamps": len(stamps), "scenes": len(scenes), "splits": {}}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if (old.get("version"), old.get("sizes"), old.get("seed")) == (VERSION, manifest["sizes"], seed):
            manifest["splits"] = old["splits"]
    todo = [(v, s) for v, s in splits if f"{v}-s{s}" not in manifest["splits"]]
    log(f"  material: {len(stamps)} stamps ({sum(s.kind == 'waterbird' for s in stamps)} waterbirds, "
        f"{sum(s.kind == 'landbird' for s in stamps)} landbirds), {len(scenes)} scenes "
        f"({sum(s.place == 'water' for s in scenes)} water); {len(todo)} split(s) to write")
    if not todo:
        return manifest
    material = Material(stamps, scenes, sizes.image_size)
    progress = Progress(len(todo) * set_sizes(sizes), "  composing images", unit="img")
    for variant, split_seed in todo:
        split = make_split(stamps, scenes, variant, split_seed, sizes.source_fraction)
        sets = write_split(out, material, split, sizes, seed + 1000 * (split_seed + 1) + 100 * VARIANTS.index(variant),
                           progress)
        manifest["splits"][split["name"]] = {
            "variant": variant,
            "sets": sets,
            "scenes": {p: {k: [scenes[i].file for i in v] for k, v in split["scenes"][p].items()} for p in PLACES},
            "photographs": photographs(scenes, split),
            "birds": {k: {part: [stamps[i].name for i in v] for part, v in parts.items()}
                      for k, parts in split["birds"].items()},
            "species": {k: {part: sorted({stamps[i].group for i in v}) for part, v in parts.items()}
                        for k, parts in split["birds"].items()},
            "source_classes": [c[0] for c in source_classes(stamps, split)],
            "heldout_classes": [stamps[i].name for i in split["heldout_classes"]],
        }
        log(f"  split {split['name']}: " + ", ".join(f"{k} {v['samples']}" for k, v in sets.items()))
        write_json(path, manifest)  # after each split: an interrupted build keeps the finished ones
    progress.close()
    return manifest


def _version(package: str) -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    return out.stdout.strip() or None
