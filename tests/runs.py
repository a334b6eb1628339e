"""Helpers for the training tests: tiny shards, a tiny model, and runs of the entry point."""
import json
import os
import re
import subprocess
import sys

from open_clip_starft.demo.data import CLASSNAMES, brace_pattern, write_shards
from open_clip_starft.demo.tiny_model import write_tiny_model

# Upstream's RandomResizedCrop with scale and ratio 1 on square images is the identity: the first
# batch is then the same whatever the sample order, so runs can be compared loss for loss.
NO_CROP = ["--aug-cfg", "scale=(1.0,1.0)", "ratio=(1.0,1.0)"]


def make_workspace(root, n=128, shards=4, seed=0):
    """Shards (``n`` 32-px JPEGs in ``shards`` tars), the tiny model and a class-names file."""
    paths = write_shards(os.path.join(root, "shards"), n, seed=seed, image_size=32, samples_per_shard=n // shards)
    model = write_tiny_model(os.path.join(root, "model"), seed=seed)
    classes = os.path.join(root, "classes.txt")
    with open(classes, "w") as f:
        f.write("\n".join(CLASSNAMES) + "\n")
    return {"root": str(root), "data": brace_pattern(paths), "model": model, "classes": classes, "shards": paths}


def train_args(ws, name, *extra, epochs=2, batch_size=32, workers=1):
    return ["--train-data", ws["data"], "--dataset-type", "webdataset", "--model", ws["model"], "--device", "cpu",
            "--batch-size", str(batch_size), "--epochs", str(epochs), "--workers", str(workers),
            "--lr", "1e-3", "--warmup", "2", "--log-every-n-steps", "1", "--seed", "0",
            "--starft-classnames", ws["classes"], "--logs", os.path.join(ws["root"], "logs"), "--name", name, *extra]


def run(module_args, cwd=None, timeout=300, launcher=(sys.executable, "-m", "open_clip_starft.main")):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([*launcher, *module_args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def log_of(ws, name):
    with open(os.path.join(ws["root"], "logs", name, "out.log")) as f:
        return f.read()


def metric(log, key):
    """Every logged value of ``key`` (e.g. ``Star_loss``, ``Contrastive_loss``, ``Star lambda``, ``Step``)."""
    return [float(v) for v in re.findall(rf"{re.escape(key)}: ([-0-9.e+naif]+)", log)]


def checkpoints(ws, name):
    folder = os.path.join(ws["root"], "logs", name, "checkpoints")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def register_tiny_config(ws, name="starft-tiny"):
    """Register the tiny architecture with OpenCLIP under ``name`` (for ``--model NAME --pretrained FILE``)."""
    import open_clip
    model_dir = ws["model"].removeprefix("local-dir:")
    with open(os.path.join(model_dir, "open_clip_config.json")) as f:
        cfg = json.load(f)["model_cfg"]
    path = os.path.join(ws["root"], f"{name}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    open_clip.add_model_config(path)
    return path
