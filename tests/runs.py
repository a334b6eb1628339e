"""Helpers for the training tests: tiny shards, a tiny model, runs of the entry point, patched copies
of open_clip_train (patches/) and a faked SLURM job (scripts/slurm/)."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import open_clip_train

from open_clip_starft.demo.data import CLASSNAMES, brace_pattern, write_shards
from open_clip_starft.tools.tiny_model import write_tiny_model

# Upstream's RandomResizedCrop with scale and ratio 1 on square images is the identity: the first
# batch is then the same whatever the sample order, so runs can be compared loss for loss.
NO_CROP = ["--aug-cfg", "scale=(1.0,1.0)", "ratio=(1.0,1.0)"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCHES = sorted(glob.glob(os.path.join(ROOT, "patches", "*.patch")))
INSTALLED = os.path.dirname(open_clip_train.__file__)
SCRIPTS = os.path.join(ROOT, "scripts", "slurm")


def make_workspace(root, n=128, shards=4, seed=0):
    """Shards (``n`` 32-px JPEGs in ``shards`` tars), the tiny model and a class-names file."""
    paths = write_shards(os.path.join(root, "shards"), n, seed=seed, image_size=32, samples_per_shard=n // shards)
    model = write_tiny_model(os.path.join(root, "model"), seed=seed)
    classes = os.path.join(root, "classes.txt")
    with open(classes, "w") as f:
        f.write("\n".join(CLASSNAMES) + "\n")
    return {"root": str(root), "data": brace_pattern(paths), "model": model, "classes": classes, "shards": paths}


def workspace(data, root):
    """``data``'s shards, model and class names (a ``make_workspace``, e.g. conftest's session-wide
    ``tiny_data``), with this workspace's runs (``train_args``' ``--logs``) under ``root``."""
    os.makedirs(root, exist_ok=True)
    return {**data, "root": str(root)}


# the session's finished run (conftest.tiny_run): StarFT settings other than the defaults, so that what
# reads its checkpoints (export's model card, resume's settings check) sees them
TINY_RUN_FLAGS = ["--starft-lambda", "0.7", "--starft-concepts", "texture", "--starft-teacher-text-cache-mb", "16"]


def sweep_workspace(root, parts: dict, models: dict | None = None):
    """A sweep's inputs under ``root``: the tiny model (``model``, seed 0, plus ``models`` {key: seed}), a
    class-names file, and for each ``parts`` entry ``name: (samples, seed, biased)`` shards named after it."""
    classes = root / "classes.txt"
    classes.write_text("\n".join(CLASSNAMES) + "\n")
    ws = {"root": root, "classes": str(classes), "model": write_tiny_model(str(root / "model"), seed=0)}
    ws.update({key: write_tiny_model(str(root / key), seed=seed) for key, seed in (models or {}).items()})
    for name, (n, seed, biased) in parts.items():
        ws[name] = brace_pattern(write_shards(str(root / name), n, seed=seed, biased=biased, image_size=32,
                                              samples_per_shard=n // 2, prefix=name))
    return ws


def train_args(ws, name, *extra, epochs=2, batch_size=32, workers=1):
    return ["--train-data", ws["data"], "--dataset-type", "webdataset", "--model", ws["model"], "--device", "cpu",
            "--batch-size", str(batch_size), "--epochs", str(epochs), "--workers", str(workers),
            "--lr", "1e-3", "--warmup", "2", "--log-every-n-steps", "1", "--seed", "0",
            "--starft-classnames", ws["classes"], "--logs", os.path.join(ws["root"], "logs"), "--name", name, *extra]


def run(module_args, cwd=None, timeout=300, launcher=None):
    """``open_clip_starft.main`` with ``module_args``: in this process (``main([...])``, the same code path
    as ``python -m open_clip_starft.main`` after start-up, without a new interpreter's ~6-20 s of imports),
    or, with a ``launcher`` (torchrun, ``python -c CODE``, upstream's main), as that command in a new process.
    Either way a ``CompletedProcess`` (returncode, stdout, stderr)."""
    if launcher is None:
        assert cwd is None, "an in-process run keeps the test's working folder"
        return run_main(module_args)
    return run_process(module_args, cwd=cwd, timeout=timeout, launcher=launcher)


def run_process(module_args, cwd=None, timeout=300, launcher=(sys.executable, "-m", "open_clip_starft.main")):
    """``launcher module_args`` in a new process (one torch thread, unbuffered output)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([*launcher, *module_args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def run_main(argv, main=None):
    """``main(argv)`` (by default ``open_clip_starft.main.main``; e.g. ``open_clip_train.main.main`` for
    upstream's plain run) in this process, as a ``CompletedProcess``: its exit status
    (an escaping exception becomes status 1 with its traceback on stderr, as the interpreter would print it;
    ``SystemExit`` its code), its stdout and stderr. Like a fresh process it runs on one torch thread, and
    what a run leaves in the process is put back afterwards: upstream's ``setup_logging`` handlers (one
    per run: left in place they would write each later run's lines into this run's out.log) and every
    logger's level, the torch thread count and the global random generators' states."""
    import contextlib
    import io
    import logging
    import random
    import traceback

    import numpy as np
    import torch

    if main is None:
        from open_clip_starft.main import main

    loggers = [logging.root, *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]
    levels = {logger: logger.level for logger in loggers}
    handlers = list(logging.root.handlers)
    threads = torch.get_num_threads()
    rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    out, err = io.StringIO(), io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main([str(a) for a in argv])
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # noqa: BLE001 - reported as a process would: status 1 and the traceback
                traceback.print_exc()
                status = 1
    finally:
        for handler in logging.root.handlers[:]:
            if handler not in handlers:
                logging.root.removeHandler(handler)
                handler.close()
        for logger, level in levels.items():
            logger.setLevel(level)
        torch.set_num_threads(threads)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
    return subprocess.CompletedProcess([main.__module__, *argv], status or 0, out.getvalue(), err.getvalue())


def one_line_error(result, *needles, status=None):
    """The run failed (with ``status`` if given) in one line ``open-clip-starft: error: …`` holding every
    needle, with no traceback; returns that line."""
    assert result.returncode != 0 and (status is None or result.returncode == status), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("open-clip-starft: error: "), result.stderr[-3000:]
    for needle in needles:
        assert needle in last, last
    return last


def log_of(ws, name):
    with open(os.path.join(ws["root"], "logs", name, "out.log")) as f:
        return f.read()


def metric(log, key):
    """Every logged value of ``key`` (e.g. ``Star_loss``, ``Contrastive_loss``, ``Star lambda``, ``Step``)."""
    return [float(v) for v in re.findall(rf"{re.escape(key)}: ([-0-9.e+naif]+)", log)]


def checkpoints(ws, name):
    folder = os.path.join(ws["root"], "logs", name, "checkpoints")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def tiny_weights(ws):
    """The weights file of the workspace's tiny local-dir model (OpenCLIP's local-dir file names)."""
    model_dir = ws["model"].removeprefix("local-dir:")
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if os.path.exists(os.path.join(model_dir, name)):
            return os.path.join(model_dir, name)
    raise FileNotFoundError(f"no weights in {model_dir}")


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


def patched_copy(tmp_path, patches, exact=True):
    """A copy of the installed open_clip_train package under ``tmp_path`` with ``patches`` applied (each
    to the exact lines of the release; with ``exact=False``, in order, later ones shifted by earlier ones)."""
    shutil.copytree(INSTALLED, tmp_path / "open_clip_train", ignore=shutil.ignore_patterns("__pycache__"))
    for patch in patches:
        result = subprocess.run(["patch", "-p1", "--forward", "--no-backup-if-mismatch", "-i", patch],
                                cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0 and "fuzz" not in result.stdout, result.stdout
        assert not exact or "offset" not in result.stdout, result.stdout
    return tmp_path


def run_python(code, pythonpath, *args, timeout=300):
    """``python CODE ARGS`` with ``pythonpath`` first on the path (e.g. a ``patched_copy``), then this checkout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pythonpath), ROOT]), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *code, *args], capture_output=True, text=True, env=env, timeout=timeout)


FAKE_SRUN = """#!/bin/bash
# srun stand-in: start $SLURM_NTASKS local copies of the command, as SLURM would on one node
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i "$@" > "$FAKE_SLURM_DIR/task-$i.log" 2>&1 &
    pids+=($!)
done
trap 'kill -USR1 "${pids[@]}"' USR1
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit "$status"
"""
FAKE_SCONTROL = """#!/bin/bash
# scontrol stand-in: one host name; requeue calls are recorded
case "$1" in
    show) echo localhost ;;
    requeue) echo "requeue $2" >> "$FAKE_SLURM_DIR/scontrol.log" ;;
esac
"""


def slurm_env(ws, tmp_path, name, port, **extra):
    """The environment of a faked 2-task SLURM job (srun/scontrol stand-ins in ``tmp_path/bin``) running
    the scripts' training on ``ws`` as run ``name``."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    for tool, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake / tool).write_text(text)
        (fake / tool).chmod(0o755)
    path = os.pathsep.join([str(fake), os.path.dirname(sys.executable), os.environ["PATH"]])
    env = dict(os.environ, PATH=path, FAKE_SLURM_DIR=str(tmp_path), OMP_NUM_THREADS="1",
               SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_JOB_NODELIST="node[001]", MASTER_PORT=str(port),
               GPUS="2", DATA=ws["data"], MODEL=ws["model"], DEVICE="cpu", OUTPUT=os.path.join(ws["root"], "logs"),
               NAME=name, EXTRA_ARGS=f"--batch-size 16 --epochs 1 --workers 1 --lr 1e-3 --log-every-n-steps 1 "
                                     f"--gather-with-grad --starft-classnames {ws['classes']}")
    env.update(extra)
    return env
