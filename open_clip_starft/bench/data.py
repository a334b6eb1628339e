"""``open-clip-starft bench data``: samples/s of our training pipeline beside upstream's ``get_wds_dataset``.

Same shards, worker count, batch size and image size; the two pipelines alternate epoch by epoch in one
run (so a busy machine slows both alike) and the first batch of each epoch (worker start-up) is not timed.
Prints the medians and their ratio; ``--out FILE`` adds the JSON record to a list of records.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import open_clip

from open_clip_starft.bench.common import add_record, today
from open_clip_starft.errors import StarftError, one_line_errors
from open_clip_starft.method.captions import CaptionBuilder, load_classnames
from open_clip_starft.method.descriptors import load_descriptors


def bench_data(args) -> dict:
    """The record: median samples/s of each pipeline over ``args.epochs`` alternating epochs, and per epoch."""
    from open_clip_train.data import get_wds_dataset
    from open_clip_train.params import parse_args

    from open_clip_starft.data.training import get_wds_train_data

    host_args = parse_args(["--train-data", args.shards, "--dataset-type", "webdataset", "--batch-size", str(args.batch_size),
                            "--workers", str(args.workers), "--seed", "0"]
                           + (["--train-num-samples", str(args.num_samples)] if args.num_samples else []))
    host_args.world_size, host_args.rank, host_args.distributed = 1, 0, False
    host_args.starft_max_skipped_fraction = 0.01
    _, preprocess, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None, force_image_size=args.image_size)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    classnames = load_classnames(args.classnames)
    builder = CaptionBuilder(classnames, descriptors=load_descriptors("background"))
    pipelines = {
        "starft": get_wds_train_data(host_args, preprocess, builder, tokenizer=tokenizer),
        "upstream": get_wds_dataset(host_args, preprocess, is_train=True, tokenizer=tokenizer),
    }
    rates = {name: [] for name in pipelines}
    counts = {name: [] for name in pipelines}  # samples each epoch gave, first batch included
    for epoch in range(args.epochs):
        for name, info in pipelines.items():
            info.set_epoch(epoch)
            samples, first, start = 0, 0, None
            for batch in info.dataloader:
                if start is None:  # the first batch carries worker start-up; time the rest
                    start, first = time.perf_counter(), len(batch[0])
                    continue
                samples += len(batch[0])
            rates[name].append(samples / (time.perf_counter() - start))
            counts[name].append(first + samples)
    ours, theirs = statistics.median(rates["starft"]), statistics.median(rates["upstream"])
    return {"shards": args.shards, "workers": args.workers, "batch_size": args.batch_size, "image_size": args.image_size,
            "epochs": args.epochs, "starft_samples_per_s": ours, "upstream_samples_per_s": theirs,
            "starft_over_upstream": ours / theirs, "per_epoch": rates, "samples_per_epoch": counts,
            "date": today()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="open-clip-starft bench data", description=__doc__.split("\n")[0])
    parser.add_argument("--shards", required=True, help="brace pattern of shards with jpg, cls and txt")
    parser.add_argument("--num-samples", type=int, help="samples per epoch if the shards have no sizes.json")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classnames", default="imagenet")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per pipeline, alternating")
    parser.add_argument("--out", metavar="FILE", help="add the record to this JSON list of records, e.g. docs/bench/data.json "
                        "(default: only print)")
    return parser


@one_line_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.workers < 0:
        raise StarftError("--epochs and --batch-size must be ≥ 1 and --workers ≥ 0")
    record = bench_data(args)
    print(f"samples/s over {args.epochs} epochs each (median): ours {record['starft_samples_per_s']:.1f}, "
          f"upstream {record['upstream_samples_per_s']:.1f}, ratio {record['starft_over_upstream']:.3f}")
    if args.out:
        add_record(args.out, record, ("shards", "workers", "batch_size", "image_size"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
