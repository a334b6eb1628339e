"""``open-clip-starft make-shards``: a class-subfolder tree or a CSV to webdataset shards.

The shards serve training (``--train-data``) and ``eval``.

    open-clip-starft make-shards /data/imagenet/train /data/imagenet-wds --samples-per-shard 1000 --workers 16
    open-clip-starft make-shards waterbirds.csv out/ --csv-path-key img_filename --csv-label-key y --csv-group-key place

Each sample holds ``jpg`` (the original JPEG bytes when the file is a JPEG, else re-encoded),
``cls`` (class id), ``group`` (when the source has groups) and ``json`` (original path, label,
class name, group). Samples are shuffled once (``--seed``) so every shard mixes classes. Shards
are written under a temporary name and renamed when complete: a rerun after an interruption keeps
the complete shards and rewrites the rest, with no sample twice. Unreadable images are reported
and skipped. Writes ``classnames.txt``, ``sizes.json`` (OpenCLIP's sample counts) and
``manifest.json`` (counts per class and group, the brace pattern, the ``--train-num-samples``).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import random
import shutil
import sys
import time

from PIL import Image

from open_clip_starft.data.samples import brace_pattern, to_rgb, write_shard
from open_clip_starft.method.captions import load_classnames
from open_clip_starft.errors import StarftError, one_line_errors
from open_clip_starft.eval.progress import Progress
from open_clip_starft.eval.sets import EvalSetSpec, Item, csv_items, folder_classnames, folder_labels, list_class_folders

STATE_DIR = ".make-shards"


def list_source(source: str, classnames_spec: str | None = None, path_key=None, label_key=None, group_key=None):
    """``(samples [(path, label, group or None)], class names, has groups)`` of a class-subfolder tree or a CSV."""
    spec = EvalSetSpec(name=os.path.basename(source.rstrip("/")) or source, root=source,
                       csv_path_key=path_key, csv_label_key=label_key, csv_group_key=group_key)
    names = load_classnames(classnames_spec) if classnames_spec else None
    if not os.path.exists(source):
        raise StarftError(f"source {source!r} does not exist: give a folder of class subfolders or a CSV")
    if os.path.isfile(source):
        if not source.lower().endswith((".csv", ".tsv")):
            raise StarftError(f"source {source!r} is neither a folder nor a .csv/.tsv file")
        items, names, group_column = csv_items(spec, source, names)
        if names is None:
            raise StarftError(f"the labels of {source!r} are class ids: pass --classnames (imagenet or a file) to name them")
        has_group = group_column is not None
    else:
        classes, samples = list_class_folders(spec, source)
        if names is None:
            names = folder_classnames(classes)
        labels = folder_labels(spec, classes, len(names), source, classnames_spec or "the class folder names")
        items = [Item(p, labels[c], 0) for p, c in samples]
        has_group = False
    samples = [(str(it.ref), int(it.label), int(it.group) if has_group else None) for it in items]
    bad = [s for s in samples if not 0 <= s[1] < len(names)]
    if bad:
        raise StarftError(f"label {bad[0][1]} of {bad[0][0]!r} is outside the {len(names)} class names: "
                          "pass --classnames that name every label")
    if not samples:
        raise StarftError(f"source {source!r} holds no images")
    return samples, names, has_group


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


def _write_shard(job) -> dict:
    """Write one shard (``data.samples.write_shard``: a temporary name, renamed when complete);
    returns its stats, then saved in the state folder."""
    out, prefix, index, start, samples, classnames, max_side = job
    final = os.path.join(out, f"{prefix}-{index:06d}.tar")
    stats = {"shard": os.path.basename(final), "count": 0, "per_class": {}, "per_group": {}, "skipped": []}

    def encoded():
        for offset, (path, label, group) in enumerate(samples):
            try:
                data = _encode(path, max_side)
            except Exception as e:  # noqa: BLE001 - every unreadable image is reported and skipped
                stats["skipped"].append({"path": path, "error": f"{type(e).__name__}: {e}"})
                continue
            meta = {"path": path, "label": label, "classname": classnames[label]}
            sample = {"__key__": f"{start + offset:09d}", "jpg": data, "cls": label}
            if group is not None:
                sample["group"] = group
                meta["group"] = group
                stats["per_group"][str(group)] = stats["per_group"].get(str(group), 0) + 1
            sample["json"] = json.dumps(meta).encode()
            stats["per_class"][str(label)] = stats["per_class"].get(str(label), 0) + 1
            yield sample

    stats["count"] = write_shard(final, encoded())
    state = os.path.join(out, STATE_DIR, f"{prefix}-{index:06d}.json")
    with open(state + ".partial", "w") as f:
        json.dump(stats, f)
    os.replace(state + ".partial", state)  # the shard counts as complete once both exist
    return stats


def _fingerprint(samples, samples_per_shard, prefix, max_side) -> str:
    h = hashlib.sha256(json.dumps([samples_per_shard, prefix, max_side]).encode())
    for s in samples:
        h.update(json.dumps(s).encode())
    return h.hexdigest()


def make_shards(source: str, out: str, *, classnames: str | None = None, samples_per_shard: int = 1000,
                workers: int = 1, prefix: str = "shard", shuffle: bool = True, seed: int = 0, max_side: int | None = None,
                path_key=None, label_key=None, group_key=None, overwrite: bool = False, limit_shards: int | None = None,
                progress: bool = True, log=print) -> dict:
    """Write the shards (see the module docstring); returns the manifest. ``limit_shards`` writes at
    most that many new shards in this call (the rest on a later one; the manifest says ``complete``)."""
    if samples_per_shard < 1 or workers < 0:
        raise StarftError("--samples-per-shard must be ≥ 1 and --workers ≥ 0")
    samples, names, has_group = list_source(source, classnames, path_key, label_key, group_key)
    if shuffle:
        random.Random(seed).shuffle(samples)
    fingerprint = _fingerprint(samples, samples_per_shard, prefix, max_side)
    state_dir = os.path.join(out, STATE_DIR)
    plan_path = os.path.join(state_dir, "plan.json")
    if os.path.isfile(plan_path):
        with open(plan_path) as f:
            old = json.load(f).get("fingerprint")
        if old != fingerprint:
            if not overwrite:
                raise StarftError(f"{out!r} holds shards of another source or settings: pick a new output folder, "
                                  "or pass --overwrite to start it afresh")
            shutil.rmtree(state_dir)
            for name in os.listdir(out):
                if name.startswith(prefix + "-") and (name.endswith(".tar") or name.endswith(".tar.partial")):
                    os.remove(os.path.join(out, name))
    os.makedirs(state_dir, exist_ok=True)
    with open(plan_path, "w") as f:
        json.dump({"fingerprint": fingerprint, "source": source, "samples": len(samples)}, f)

    n_shards = (len(samples) + samples_per_shard - 1) // samples_per_shard
    jobs, done = [], []
    for i in range(n_shards):
        final = os.path.join(out, f"{prefix}-{i:06d}.tar")
        state = os.path.join(state_dir, f"{prefix}-{i:06d}.json")
        if os.path.isfile(final) and os.path.isfile(state):
            done.append(i)
            continue
        chunk = samples[i * samples_per_shard:(i + 1) * samples_per_shard]
        jobs.append((out, prefix, i, i * samples_per_shard, chunk, names, max_side))
    for name in os.listdir(out):  # leftovers of an interrupted run
        if name.endswith(".partial"):
            os.remove(os.path.join(out, name))
    if limit_shards is not None:
        jobs = jobs[:limit_shards]
    log(f"{len(samples)} images of {len(names)} classes → {n_shards} shard(s) of {samples_per_shard} in {out}"
        + (f" ({len(done)} complete shard(s) kept)" if done else ""))

    bar = Progress(sum(len(j[4]) for j in jobs), "make-shards", enabled=progress)

    def finished(stats):
        bar.update(stats["count"] + len(stats["skipped"]))
        for s in stats["skipped"]:
            bar.write(f"skipped unreadable image {s['path']}: {s['error']}", file=sys.stderr)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                finished(_write_shard(job))
        else:
            with multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn").Pool(min(workers, len(jobs))) as pool:
                for stats in pool.imap_unordered(_write_shard, jobs):
                    finished(stats)
    finally:
        bar.close()

    # the manifest, from every complete shard's stats
    per_class, per_group, sizes, skipped = {}, {}, {}, []
    complete = 0
    for i in range(n_shards):
        state = os.path.join(state_dir, f"{prefix}-{i:06d}.json")
        if not (os.path.isfile(state) and os.path.isfile(os.path.join(out, f"{prefix}-{i:06d}.tar"))):
            continue
        complete += 1
        with open(state) as f:
            st = json.load(f)
        sizes[st["shard"]] = st["count"]
        skipped += st["skipped"]
        for k, v in st["per_class"].items():
            per_class[names[int(k)]] = per_class.get(names[int(k)], 0) + v
        for k, v in st["per_group"].items():
            per_group[k] = per_group.get(k, 0) + v
    total = sum(sizes.values())
    pattern = brace_pattern(f"{os.path.join(os.path.abspath(out), prefix)}-{i:06d}.tar" for i in range(n_shards))
    with open(os.path.join(out, "classnames.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    sizes_path = os.path.join(out, "sizes.json")
    if os.path.isfile(sizes_path):
        with open(sizes_path) as f:
            sizes = {**{k: v for k, v in json.load(f).items() if not k.startswith(prefix + "-")}, **sizes}
    with open(sizes_path, "w") as f:
        json.dump(sizes, f, indent=1, sort_keys=True)
    manifest = {
        "source": os.path.abspath(source), "complete": complete == n_shards, "shards": n_shards,
        "shards_complete": complete, "samples_per_shard": samples_per_shard, "pattern": pattern,
        "samples": total, "train_num_samples": total, "classnames": os.path.abspath(os.path.join(out, "classnames.txt")),
        "num_classes": len(names), "per_class": {n: per_class.get(n, 0) for n in names},
        "per_group": dict(sorted(per_group.items(), key=lambda kv: int(kv[0]))) if has_group else None,
        "skipped": skipped, "shuffled": shuffle, "seed": seed, "max_side": max_side,
        "train_args": f"--train-data '{pattern}' --dataset-type webdataset --train-num-samples {total}",
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
    if complete < n_shards:
        log(f"{complete} of {n_shards} shards complete: run the same command again to finish")
    else:
        log(f"wrote {total} samples in {n_shards} shard(s)" + (f"; skipped {len(skipped)} unreadable image(s)" if skipped else ""))
        log(f"train with: {manifest['train_args']}")
    return manifest


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
    start = time.time()
    make_shards(args.source, args.out, classnames=args.classnames, samples_per_shard=args.samples_per_shard,
                workers=args.workers, prefix=args.prefix, shuffle=not args.no_shuffle, seed=args.seed,
                max_side=args.max_side, path_key=args.csv_path_key, label_key=args.csv_label_key,
                group_key=args.csv_group_key, overwrite=args.overwrite, limit_shards=args.limit_shards,
                progress=not args.no_progress)
    print(f"done in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
