"""Bad input to the entry point: a non-zero exit and one line that names the input and the fix."""
import io
import os

import pytest
import webdataset as wds

from open_clip_starft.demo.data import brace_pattern, render_sample
from runs import checkpoints, log_of, metric, one_line_error, run, tiny_weights, train_args, workspace


@pytest.fixture(scope="module")
def ws(small_data, tmp_path_factory):
    return workspace(small_data, tmp_path_factory.mktemp("errors"))


def write_shard(path, n, *, cls=True, seed=5):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with wds.TarWriter(path) as sink:
        for i in range(n):
            image, label, _ = render_sample(i, seed=seed, image_size=32)
            buf = io.BytesIO()
            image.save(buf, format="JPEG")
            sample = {"__key__": f"x{i:04d}", "jpg": buf.getvalue()}
            if cls:
                sample["cls"] = str(label).encode()
            sink.write(sample)
    return path


def test_train_data_that_matches_no_file(ws):
    args = train_args(ws, "nofile")
    args[args.index("--train-data") + 1] = os.path.join(ws["root"], "nowhere", "train-{0000..0003}.tar")
    one_line_error(run(args), "--train-data", "matches no file", "brace pattern")


def test_shards_without_cls(ws):
    pattern = brace_pattern([write_shard(os.path.join(ws["root"], "nocls", f"n-{i:06d}.tar"), 32, cls=False)
                             for i in range(2)])
    args = train_args(ws, "nocls", "--train-num-samples", "64")
    args[args.index("--train-data") + 1] = pattern
    one_line_error(run(args), "skipped", "'cls'", "--starft-max-skipped-fraction")


def test_class_id_beyond_the_class_names(ws):
    two = os.path.join(ws["root"], "two-classes.txt")
    with open(two, "w") as f:
        f.write("circle\nsquare\n")
    args = train_args(ws, "range")
    args[args.index("--starft-classnames") + 1] = two
    one_line_error(run(args), "outside the 2 class names", "--starft-classnames")


def test_negative_lambda(ws):
    one_line_error(run(train_args(ws, "neg", "--starft-lambda", "-1")), "--starft-lambda -1", "≥ 0")


def test_unknown_concept(ws):
    one_line_error(run(train_args(ws, "concept", "--starft-concepts", "weather")), "'weather'", "background")


def test_unknown_schedule_value(ws):
    one_line_error(run(train_args(ws, "sched", "--starft-schedule", "cosine")), "--starft-schedule 'cosine'", "linear")


def test_missing_classnames_file(ws):
    args = train_args(ws, "noclasses")
    args[args.index("--starft-classnames") + 1] = os.path.join(ws["root"], "missing.txt")
    one_line_error(run(args), "missing.txt", "not found")


def test_corrupt_tar_among_good_ones_is_skipped_and_training_finishes(ws):
    folder = os.path.join(ws["root"], "mixed")
    good = [write_shard(os.path.join(folder, f"m-{i:06d}.tar"), 32, seed=i) for i in (0, 1, 3)]
    corrupt = write_shard(os.path.join(folder, "m-000002.tar"), 32, seed=2)
    with open(corrupt, "r+b") as f:  # truncate mid-member and scribble over a header
        f.truncate(os.path.getsize(corrupt) // 2)
        f.seek(512 * 3)
        f.write(b"\xff" * 512)
    assert len(good) == 3
    args = train_args(ws, "corrupt", "--train-num-samples", "96", "--starft-max-skipped-fraction", "0.5", epochs=1)
    args[args.index("--train-data") + 1] = os.path.join(folder, "m-{000000..000003}.tar")
    result = run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    log = log_of(ws, "corrupt")
    assert "Skipping unreadable training data" in log
    unreadable = [int(v) for v in __import__("re").findall(r"(\d+) unreadable shard read\(s\)", log)]
    assert unreadable and unreadable[-1] >= 1
    assert metric(log, "Step")[-1] == 2  # 96 samples / 32 per batch = 3 steps (0, 1, 2)


def test_coca_is_refused_saying_why(ws):
    one_line_error(run(train_args(ws, "coca", "--model", "coca_ViT-B-32")), "CoCa's captioning loss",
                   "no StarFT counterpart")


def test_infinite_lambda(ws):
    one_line_error(run(train_args(ws, "inf", "--starft-lambda", "inf")), "--starft-lambda inf", "finite")


@pytest.mark.parametrize("precision", ["fp32", "amp"])
def test_a_non_finite_loss_stops_the_run_and_is_never_saved(ws, precision):
    """A learning rate that blows the weights up after step 0: the loss of step 1 is not finite. Under
    amp the scaler would skip every later step silently and the run would save the initial weights."""
    name = f"nan-{precision}"
    result = run(train_args(ws, name, "--lr", "1e30", "--precision", precision, epochs=2))
    last = one_line_error(result, "non-finite loss at step 1 (epoch 0, batch 1)", "contrastive_loss=", "star_loss=",
                          "--lr")
    assert "nan" in last or "inf" in last
    assert checkpoints(ws, name) == []


def test_local_dir_model_with_pretrained_is_refused(ws):
    weights = tiny_weights(ws)
    one_line_error(run(train_args(ws, "localpre", "--pretrained", weights)), "--pretrained", "is ignored",
                   "open-clip-starft export", "--model NAME --pretrained CKPT")
