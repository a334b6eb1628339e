"""``open-clip-starft make-shards``: a class-subfolder tree or a CSV to webdataset shards.

The shards serve training (``--train-data``) and ``eval``.

    open-clip-starft make-shards /data/imagenet/train /data/imagenet-wds --samples-per-shard 1000 --workers 16
    open-clip-starft make-shards waterbirds.csv out/ --csv-path-key img_filename --csv-label-key y --csv-group-key place

Each sample holds ``jpg`` (the original JPEG bytes when the file is a JPEG, else re-encoded),
``cls`` (class id), ``group`` (when the source has groups) and ``json`` (original path, label,
class name, group). Samples are shuffled once (``--seed``) so every shard mixes classes. Shards
are written under a temporary name and renamed when complete: a rerun after an interruption keeps
the complete shards and rewrites the rest, with no sample twice, and rewrites a shard whose images
skipped as unreadable read now (restored or repaired); a source that lists other images than the
shards were written from is refused (``--overwrite`` rebuilds). Unreadable images are reported and
skipped; a run that ends with no sample at all fails. In a class folder, symlinked subfolders are not
followed and each real file is sampled once (a symlinked file pointing out of the tree is left
out); what was left out is logged and counted in the manifest. Writes ``classnames.txt``, ``sizes.json`` (OpenCLIP's sample counts) and
``manifest.json`` (counts per class and group, the brace pattern, the ``--train-num-samples``).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import shutil
import sys
import time

from PIL import Image
from tqdm.contrib.logging import logging_redirect_tqdm

from open_clip_starft.data import files
from open_clip_starft.data.samples import brace_pattern, to_rgb, update_sizes, write_shard
from open_clip_starft.method.captions import load_classnames
from open_clip_starft.errors import ConfigError, DataError, one_line_errors
from open_clip_starft.eval.progress import Progress
from open_clip_starft.eval.sets import EvalSetSpec, Item, csv_items, folder_classnames, folder_labels, is_image

LOG = logging.getLogger(__name__)
STATE_DIR = ".make-shards"

# why a file or folder of the source is not sampled (the keys of ``left_out``)
SYMLINKED_FOLDER = "symlinked folder(s) inside a class folder, not followed"
LINK_OUT_OF_TREE = "symlinked file(s) pointing out of the source tree"
DUPLICATE = "file(s) already listed under their real path"
NOT_UTF8 = "file name(s) that are not UTF-8"


def _utf8(name: str) -> bool:
    """Whether ``name`` (as ``os`` decodes it, undecodable bytes as surrogates) is valid UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(path: str) -> str:
    """``path`` as text that JSON and logs can hold: itself, or its ``repr`` when it is not UTF-8."""
    return path if _utf8(path) else repr(path)


def _inside(real: str, roots) -> bool:
    return any(os.path.commonpath([real, root]) == root for root in roots)


def _class_folders(source: str) -> list[str]:
    """The class folder names of ``source`` (sorted; a symlinked class folder counts as a class, as the
    user made it one); a DataError when there is none or one is not UTF-8."""
    try:
        classes = sorted(e.name for e in os.scandir(source) if e.is_dir())
    except OSError as e:
        raise DataError(f"cannot read the class folders of {source!r} ({e}): check the folder") from None
    if not classes:
        raise DataError(f"{source!r} has no class subfolders: give a folder of class subfolders")
    bad = [c for c in classes if not _utf8(c)]
    if bad:
        raise DataError(f"class folder {bad[0]!r} of {source!r} has a name that is not UTF-8: rename it")
    return classes


def _walk_class(folder: str, left_out) -> tuple[list[str], list[str]]:
    """``(regular image files, symlinked image files)`` under a class folder, in ImageFolder's order
    (sorted folders, then sorted names). Symlinked folders are not entered and file names that are not
    UTF-8 are left out (both noted in ``left_out``)."""
    found = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        for d in dirs:
            if os.path.islink(os.path.join(root, d)):
                left_out[SYMLINKED_FOLDER].append(_shown(os.path.join(root, d)))
        found += [(root, name) for name in names if is_image(name)]
    regular, links = [], []
    for root, name in sorted(found):
        path = os.path.join(root, name)
        if not _utf8(path):
            left_out[NOT_UTF8].append(_shown(path))
        else:
            (links if os.path.islink(path) else regular).append(path)
    return regular, links


def list_tree(source: str) -> tuple[list[str], list[tuple[str, int]], dict]:
    """``(class folder names, [(image path, class index)], left_out {reason: [paths]})`` of a
    class-subfolder tree, each real image once.

    Symlinked folders inside a class are not followed (a link to ``.`` would list a folder again and
    again, one to another class would label its images with this one). Files are de-duplicated by
    real path: a symlinked file is kept only when it points into the tree (the source or a class
    folder) at a file not listed under its own path; a regular file reached twice (through a
    symlinked class folder) counts once, in the first class in sorted order."""
    classes = _class_folders(source)
    roots = {os.path.realpath(source)} | {os.path.realpath(os.path.join(source, c)) for c in classes}
    left_out = collections.defaultdict(list)
    walked = [_walk_class(os.path.join(source, c), left_out) for c in classes]
    seen, samples = set(), []
    for link_pass in (False, True):
        for index, (regular, links) in enumerate(walked):
            for path in links if link_pass else regular:
                real = os.path.realpath(path)
                if link_pass and not _inside(real, roots):
                    left_out[LINK_OUT_OF_TREE].append(f"{path} -> {_shown(real)}")
                elif real in seen:
                    left_out[DUPLICATE].append(f"{path} (= {_shown(real)})")
                else:
                    seen.add(real)
                    samples.append((index, path))
    return classes, [(path, index) for index, path in sorted(samples)], dict(left_out)


def list_source(source: str, classnames_spec: str | None = None, path_key=None, label_key=None, group_key=None):
    """``(samples [(path, label, group or None)], class names, has groups, left_out {reason: [paths]})``
    of a class-subfolder tree (``list_tree``) or a CSV."""
    spec = EvalSetSpec(name=os.path.basename(source.rstrip("/")) or source, root=source,
                       csv_path_key=path_key, csv_label_key=label_key, csv_group_key=group_key)
    names = load_classnames(classnames_spec) if classnames_spec else None
    if not os.path.exists(source):
        raise DataError(f"source {source!r} does not exist: give a folder of class subfolders or a CSV")
    left_out = {}
    if os.path.isfile(source):
        if not source.lower().endswith((".csv", ".tsv")):
            raise DataError(f"source {source!r} is neither a folder nor a .csv/.tsv file")
        items, names, group_column = csv_items(spec, source, names)
        if names is None:
            raise ConfigError(f"the labels of {source!r} are class ids: pass --classnames (imagenet or a file) to name them")
        has_group = group_column is not None
    else:
        classes, samples, left_out = list_tree(source)
        if names is None:
            names = folder_classnames(classes)
        labels = folder_labels(spec, classes, names, source, classnames_spec or "the class folder names")
        items = [Item(p, labels[c], 0) for p, c in samples]
        has_group = False
    samples = [(str(it.ref), int(it.label), int(it.group) if has_group else None) for it in items]
    bad = [s for s in samples if not 0 <= s[1] < len(names)]
    if bad:
        raise ConfigError(f"label {bad[0][1]} of {bad[0][0]!r} is outside the {len(names)} class names: "
                          "pass --classnames that name every label")
    if not samples:
        raise DataError(f"source {source!r} holds no images")
    return samples, names, has_group, left_out


def _log_left_out(left_out: dict) -> None:
    """One warning line per reason: the count and an example."""
    for reason, paths in left_out.items():
        LOG.warning(f"left out {len(paths)} {reason} (e.g. {paths[0]})")


def _encode(path: str, max_side: int | None) -> bytes:
    """JPEG bytes of an image: the file itself when it is a decodable 8-bit JPEG that needs no
    resizing, else decoded through ``to_rgb`` (16-bit images scaled to 8 bit, not clipped white)."""
    with open(path, "rb") as f:
        raw = f.read()
    image = Image.open(io.BytesIO(raw))
    image.load()  # a truncated or corrupt file fails here
    too_big = max_side is not None and max(image.size) > max_side
    if image.format == "JPEG" and image.mode in ("RGB", "L") and not too_big:
        return raw
    image = to_rgb(image)
    if too_big:
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@dataclasses.dataclass
class _ShardJob:
    """One shard to write: ``samples`` [(path, label, group)] keyed from ``start``."""
    out: str
    prefix: str
    index: int
    start: int
    samples: list
    classnames: list
    max_side: int | None

    def name(self, ext: str = "tar") -> str:
        return f"{self.prefix}-{self.index:06d}.{ext}"


def _state_path(out: str, name: str) -> str:
    return os.path.join(out, STATE_DIR, name)


def _shard_samples(job: _ShardJob, stats: dict):
    """The job's sample dicts, its images encoded; unreadable images are recorded in ``stats``."""
    for offset, (path, label, group) in enumerate(job.samples):
        try:
            data = _encode(path, job.max_side)
        except Exception as e:  # noqa: BLE001 - every unreadable image is reported and skipped
            stats["skipped"].append({"path": path, "error": f"{type(e).__name__}: {e}"})
            continue
        meta = {"path": path, "label": label, "classname": job.classnames[label]}
        sample = {"__key__": f"{job.start + offset:09d}", "jpg": data, "cls": label}
        if group is not None:
            sample["group"] = group
            meta["group"] = group
            stats["per_group"][str(group)] = stats["per_group"].get(str(group), 0) + 1
        sample["json"] = json.dumps(meta).encode()
        stats["per_class"][str(label)] = stats["per_class"].get(str(label), 0) + 1
        yield sample


def _write_shard(job: _ShardJob) -> dict:
    """Write one shard (``data.samples.write_shard``: a temporary name, renamed when complete), then
    its stats in the state folder: the shard counts as complete once both exist (a rewrite removes
    the old stats first)."""
    state = _state_path(job.out, job.name("json"))
    if os.path.exists(state):
        os.remove(state)
    stats = {"shard": job.name(), "count": 0, "per_class": {}, "per_group": {}, "skipped": []}
    stats["count"] = write_shard(os.path.join(job.out, job.name()), _shard_samples(job, stats))
    files.write_json(state, stats, indent=None)
    return stats


def _fingerprint(samples, samples_per_shard, prefix, max_side) -> str:
    h = hashlib.sha256(json.dumps([samples_per_shard, prefix, max_side]).encode())
    for s in samples:
        h.update(json.dumps(s).encode())
    return h.hexdigest()


def _mismatch(out: str, old: dict, settings: dict, n_samples: int) -> str:
    """Why the shards in ``out`` (plan ``old``) are not the ones asked for, in words."""
    changed = [f"{k} {old['settings'].get(k)!r} → {v!r}" for k, v in settings.items()
               if "settings" in old and old["settings"].get(k) != v]
    if changed:
        why = "settings changed: " + ", ".join(changed)
    else:
        why = (f"the source changed: it lists {n_samples} image(s) now, {old.get('samples', '?')} when they were "
               "written (images added, removed, renamed or restored)")
    return (f"{out!r} holds shards of another source or settings ({why}): pass --overwrite to rebuild them "
            "from the current source, or pick a new output folder")


def _prepare_out(out: str, prefix: str, plan: dict, overwrite: bool) -> None:
    """Check that ``out`` holds no shards of another plan (start afresh with ``overwrite``), remove
    the temporary files of an interrupted run, and record ``plan``."""
    state_dir = os.path.join(out, STATE_DIR)
    plan_path = os.path.join(state_dir, "plan.json")
    try:
        old = files.read_json(plan_path)
    except ValueError:  # an unreadable record (older versions wrote it in place): shards of an unknown plan
        old = {}
    if old is not None and old.get("fingerprint") != plan["fingerprint"]:
        if not overwrite:
            raise ConfigError(_mismatch(out, old, plan["settings"], plan["samples"]))
        shutil.rmtree(state_dir)
        for name in os.listdir(out):
            if name.startswith(prefix + "-") and ".tar" in name:
                os.remove(os.path.join(out, name))
    os.makedirs(state_dir, exist_ok=True)
    for folder in (out, state_dir):  # leftovers of an interrupted run (NAME.partial-PID)
        for name in os.listdir(folder):
            if files.PARTIAL in name:
                os.remove(os.path.join(folder, name))
    files.write_json(plan_path, plan)


def _restored(stats: dict, max_side: int | None) -> list[str]:
    """The images a complete shard skipped as unreadable that now read (restored or repaired since)."""
    readable = []
    for s in stats["skipped"]:
        try:
            _encode(s["path"], max_side)
        except Exception:  # noqa: BLE001 - still unreadable
            continue
        readable.append(s["path"])
    return readable


def _plan_jobs(out: str, prefix: str, samples: list, samples_per_shard: int, names: list, max_side) -> tuple[list, list]:
    """``(jobs, complete shard indexes kept)``: a shard is rewritten when it or its stats are missing,
    or when an image it skipped as unreadable now reads."""
    jobs, done, restored = [], [], []
    for i in range(0, len(samples), samples_per_shard):
        job = _ShardJob(out, prefix, i // samples_per_shard, i, samples[i:i + samples_per_shard], names, max_side)
        state = _state_path(out, job.name("json"))
        if os.path.isfile(os.path.join(out, job.name())) and os.path.isfile(state):
            now = _restored(files.read_json(state), max_side)
            if not now:
                done.append(job.index)
                continue
            restored += now
        jobs.append(job)
    if restored:
        LOG.info(f"{len(restored)} image(s) unreadable in an earlier run now read (e.g. {restored[0]}): "
                 "rewriting their shard(s)")
    return jobs, done


def _run_jobs(jobs: list, workers: int, progress: bool) -> None:
    """Write the shards, ``workers`` at a time, with a progress bar; unreadable images are named in
    warnings as they come."""
    bar = Progress(sum(len(j.samples) for j in jobs), "make-shards", enabled=progress)

    def finished(stats):
        bar.update(stats["count"] + len(stats["skipped"]))
        for s in stats["skipped"]:
            LOG.warning(f"skipped unreadable image {s['path']}: {s['error']}")
    with bar, logging_redirect_tqdm():
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                finished(_write_shard(job))
        else:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with multiprocessing.get_context(method).Pool(min(workers, len(jobs))) as pool:
                for stats in pool.imap_unordered(_write_shard, jobs):
                    finished(stats)


def _summarize(out: str, prefix: str, n_shards: int, names: list) -> dict:
    """Counts over every complete shard's stats: ``complete``, ``sizes``, ``per_class``, ``per_group``, ``skipped``."""
    total = {"complete": 0, "sizes": {}, "per_class": {n: 0 for n in names}, "per_group": {}, "skipped": []}
    for i in range(n_shards):
        state = _state_path(out, f"{prefix}-{i:06d}.json")
        if not (os.path.isfile(state) and os.path.isfile(os.path.join(out, f"{prefix}-{i:06d}.tar"))):
            continue
        stats = files.read_json(state)
        total["complete"] += 1
        total["sizes"][stats["shard"]] = stats["count"]
        total["skipped"] += stats["skipped"]
        for k, v in stats["per_class"].items():
            total["per_class"][names[int(k)]] += v
        for k, v in stats["per_group"].items():
            total["per_group"][k] = total["per_group"].get(k, 0) + v
    return total


def _write_outputs(source: str, out: str, prefix: str, n_shards: int, names: list, has_group: bool,
                   left_out: dict, settings: dict) -> dict:
    """``classnames.txt``, ``sizes.json`` (``data.samples.update_sizes``) and ``manifest.json``, each
    written atomically; returns the manifest. A DataError when every shard is complete and they hold
    no sample (every image was unreadable): nothing is written then."""
    summary = _summarize(out, prefix, n_shards, names)
    total = sum(summary["sizes"].values())
    if summary["complete"] == n_shards and total == 0:
        first = summary["skipped"][0]
        raise DataError(f"wrote 0 samples: all {len(summary['skipped'])} image(s) of {source!r} are unreadable "
                        f"(e.g. {first['path']}: {first['error']}): check the images")
    pattern = brace_pattern(f"{os.path.join(os.path.abspath(out), prefix)}-{i:06d}.tar" for i in range(n_shards))
    files.write_text(os.path.join(out, "classnames.txt"), "\n".join(names) + "\n")
    update_sizes(out, prefix, summary["sizes"])
    manifest = {
        "source": os.path.abspath(source), "complete": summary["complete"] == n_shards, "shards": n_shards,
        "shards_complete": summary["complete"], "samples_per_shard": settings["samples_per_shard"], "pattern": pattern,
        "samples": total, "train_num_samples": total, "classnames": os.path.abspath(os.path.join(out, "classnames.txt")),
        "num_classes": len(names), "per_class": summary["per_class"],
        "per_group": dict(sorted(summary["per_group"].items(), key=lambda kv: int(kv[0]))) if has_group else None,
        "skipped": summary["skipped"], "left_out": {k: {"count": len(v), "example": v[0]} for k, v in left_out.items()},
        "shuffled": settings["shuffle"], "seed": settings["seed"], "max_side": settings["max_side"],
        "train_args": f"--train-data '{pattern}' --dataset-type webdataset --train-num-samples {total}",
    }
    files.write_json(os.path.join(out, "manifest.json"), manifest)
    return manifest


def make_shards(source: str, out: str, *, classnames: str | None = None, samples_per_shard: int = 1000,
                workers: int = 1, prefix: str = "shard", shuffle: bool = True, seed: int = 0, max_side: int | None = None,
                path_key=None, label_key=None, group_key=None, overwrite: bool = False, limit_shards: int | None = None,
                progress: bool = True) -> dict:
    """Write the shards (see the module docstring); returns the manifest. ``limit_shards`` writes at
    most that many new shards in this call (the rest on a later one; the manifest says ``complete``).
    Progress and warnings go to this module's logger."""
    if samples_per_shard < 1 or workers < 0:
        raise ConfigError("--samples-per-shard must be ≥ 1 and --workers ≥ 0")
    samples, names, has_group, left_out = list_source(source, classnames, path_key, label_key, group_key)
    _log_left_out(left_out)
    if shuffle:
        random.Random(seed).shuffle(samples)
    settings = {"samples_per_shard": samples_per_shard, "prefix": prefix, "shuffle": shuffle, "seed": seed,
                "max_side": max_side, "classnames": classnames, "csv_keys": [path_key, label_key, group_key]}
    _prepare_out(out, prefix, {"fingerprint": _fingerprint(samples, samples_per_shard, prefix, max_side),
                               "settings": settings, "source": source, "samples": len(samples)}, overwrite)
    jobs, done = _plan_jobs(out, prefix, samples, samples_per_shard, names, max_side)
    n_shards = len(jobs) + len(done)
    LOG.info(f"{len(samples)} images of {len(names)} classes → {n_shards} shard(s) of {samples_per_shard} in {out}"
             + (f" ({len(done)} complete shard(s) kept)" if done else ""))
    _run_jobs(jobs[:limit_shards] if limit_shards is not None else jobs, workers, progress)
    return _write_outputs(source, out, prefix, n_shards, names, has_group, left_out, settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="open-clip-starft make-shards", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("source", help="a folder of class subfolders, or a CSV/TSV (image path, label, optional group)")
    parser.add_argument("out", help="output folder for the shards, classnames.txt, sizes.json and manifest.json")
    parser.add_argument("--classnames", metavar="imagenet|FILE", help="class names by label (default: folder names / CSV label names)")
    parser.add_argument("--samples-per-shard", type=int, default=1000, metavar="N")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="parallel shard writers")
    parser.add_argument("--prefix", default="shard", help="shard file prefix (default shard → shard-000000.tar)")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the source order (default: shuffled once with --seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-side", type=int, metavar="PX", help="downscale images whose longer side exceeds PX")
    parser.add_argument("--csv-path-key", metavar="COL")
    parser.add_argument("--csv-label-key", metavar="COL")
    parser.add_argument("--csv-group-key", metavar="COL")
    parser.add_argument("--overwrite", action="store_true", help="start afresh when OUT holds shards of another source or settings")
    parser.add_argument("--limit-shards", type=int, metavar="N", help="write at most N shards now (the rest on a later run)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (default: a bar on a terminal, a line every 30 s in logs)")
    return parser


@one_line_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.time()
    manifest = make_shards(args.source, args.out, classnames=args.classnames, samples_per_shard=args.samples_per_shard,
                           workers=args.workers, prefix=args.prefix, shuffle=not args.no_shuffle, seed=args.seed,
                           max_side=args.max_side, path_key=args.csv_path_key, label_key=args.csv_label_key,
                           group_key=args.csv_group_key, overwrite=args.overwrite, limit_shards=args.limit_shards,
                           progress=not args.no_progress)
    if not manifest["complete"]:
        print(f"{manifest['shards_complete']} of {manifest['shards']} shards complete: run the same command again to finish")
    else:
        skipped = len(manifest["skipped"])
        print(f"wrote {manifest['samples']} samples in {manifest['shards']} shard(s)"
              + (f"; skipped {skipped} unreadable image(s)" if skipped else ""))
        print(f"train with: {manifest['train_args']}")
    print(f"done in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
