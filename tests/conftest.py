"""Session-wide inputs for the tests, built once per test run (the builders are in runs.py).

- ``tiny_data``: 128 real-JPEG samples in 4 shards, the tiny model (seed 0) and a class-names file;
- ``small_data``: the same with 64 samples in 2 shards (2 steps an epoch at batch 32);
- ``tiny_run``: a finished 2-epoch StarFT run on ``small_data`` (non-default StarFT settings, see
  ``TINY_RUN_FLAGS``) that tests read: its checkpoints, params.txt and out.log;
- ``wheel_files``: the file names in the wheel ``pip wheel`` builds from this checkout (what ``pip install .``
  installs), built once (one build shared by pytest-xdist's workers).

Never write into them: a test that trains takes ``workspace(data, folder)`` (runs.py), which shares the
data and model but puts its runs' logs under a folder of its own.
"""
import logging
import os
import subprocess
import sys
import zipfile

import pytest

from runs import ROOT, TINY_RUN_FLAGS, checkpoints, log_of, make_workspace, run, train_args, workspace


def pytest_configure(config):
    """Under ``-n N`` (pytest-xdist) each worker computes on its share of the cores: N workers each running torch
    with every core would oversubscribe them (torch's threads spin while they wait)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True)
def root_logger_as_found():
    """Each test leaves the root logger's handlers as it found them (pytest's own aside), as a process per
    run would: a handler a test's in-process call adds (upstream's ``setup_logging`` on a ``main([...])``
    called directly, ``basicConfig``) writes to that test's captured stream, which is closed afterwards, and
    every later log line would then print a '--- Logging error ---' traceback into later tests' stderr."""
    before = set(logging.root.handlers)
    yield
    for handler in logging.root.handlers[:]:
        if handler not in before and not type(handler).__module__.startswith("_pytest"):
            logging.root.removeHandler(handler)
            handler.close()


@pytest.fixture(autouse=True)
def open_clip_model_configs_as_found():
    """Each test leaves OpenCLIP's model-config registry as it found it: a config a test registers
    (``open_clip.add_model_config``) under a name would otherwise stay for every later test of the process, and
    which tests share a process depends on ``-n`` (export's card names a registered config by its name)."""
    import open_clip.factory as factory
    configs, paths = dict(factory._MODEL_CONFIGS), list(factory._MODEL_CONFIG_PATHS)
    yield
    factory._MODEL_CONFIGS, factory._MODEL_CONFIG_PATHS[:] = configs, paths


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("tiny-data"), n=128, shards=4)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("small-data"), n=64, shards=2)


@pytest.fixture(scope="session")
def tiny_run(small_data, tmp_path_factory):
    """``small_data`` trained 2 epochs (batch 32: 2 steps an epoch, every step logged) as run ``run`` with
    ``TINY_RUN_FLAGS``; returns the workspace plus ``name``, ``folder`` (the run folder), ``log`` (out.log's
    text) and ``checkpoints`` (epoch_1.pt and epoch_2.pt, full paths)."""
    ws = workspace(small_data, tmp_path_factory.mktemp("tiny-run"))
    result = run(train_args(ws, "run", *TINY_RUN_FLAGS, epochs=2))
    assert result.returncode == 0, result.stderr[-3000:]
    folder = os.path.join(ws["root"], "logs", "run")
    saved = [os.path.join(folder, "checkpoints", name) for name in checkpoints(ws, "run")]
    return {**ws, "name": "run", "folder": folder, "log": log_of(ws, "run"), "checkpoints": saved}


@pytest.fixture(scope="session")
def wheel_files(tmp_path_factory):
    """Built once per test run, also with ``-n`` (pytest-xdist): ``pip wheel`` builds in the checkout's own
    ``build/``, so two workers building at once would race; the first builds under a lock in the folder the
    workers share, the others read its wheel."""
    from filelock import FileLock  # torch's own dependency
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared
    out = shared / "wheel"
    with FileLock(str(shared / "wheel.lock")):
        if not list(out.glob("open_clip_starft-*.whl")):
            subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(out), ROOT], check=True, capture_output=True)
    (wheel,) = out.glob("open_clip_starft-*.whl")
    return zipfile.ZipFile(wheel).namelist()


@pytest.fixture(scope="session")
def readme_row():
    """README's evidence-table cells for a ``unit_summary`` (shares): ``+6.7 ± 5.3 | 6 / 3 / 1 |`` in points, with
    a typographic minus: the tests that check README's tables against the shipped records quote it so."""
    def quoted(d: dict) -> str:
        return (f"{100 * d['mean']:+.1f} ± {100 * d['ci95']:.1f}".replace("-", "−")
                + f" | {d['wins']} / {d['ties']} / {d['losses']} |")
    return quoted
