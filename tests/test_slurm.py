"""The SLURM scripts: lint, and each launch line run on CPU with a faked 2-task SLURM job."""
import os
import re
import shutil
import subprocess

import pytest

from runs import SCRIPTS, checkpoints, slurm_env, workspace

SBATCH = sorted(f for f in os.listdir(SCRIPTS) if f.endswith(".sbatch"))


@pytest.mark.parametrize("script", SBATCH)
def test_scripts_pass_bash_n_and_shellcheck(script):
    path = os.path.join(SCRIPTS, script)
    subprocess.run(["bash", "-n", path], check=True)
    assert shutil.which("shellcheck"), "shellcheck is needed (Debian package shellcheck; .ci/run installs it)"
    result = subprocess.run(["shellcheck", path], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.fixture(scope="module")
def ws(small_data, tmp_path_factory):
    return workspace(small_data, tmp_path_factory.mktemp("slurm"))


def rank_fingerprints(text):
    return {int(r): float(v) for r, v in re.findall(r"StarFT rank (\d+): model fingerprint after epoch 0: ([0-9.e+]+)", text)}


def assert_two_ranks_agree(text):
    prints = rank_fingerprints(text)
    assert set(prints) == {0, 1}, text[-3000:]
    assert prints[0] == prints[1]


@pytest.mark.e2e
def test_multinode_script_with_srun_two_tasks(ws, tmp_path):
    env = slurm_env(ws, tmp_path, "srun2", 29611)
    result = subprocess.run(["bash", os.path.join(SCRIPTS, "train_multinode.sbatch")], env=env,
                            capture_output=True, text=True, timeout=600)
    logs = "".join((tmp_path / f"task-{i}.log").read_text() for i in range(2))
    assert result.returncode == 0, result.stderr[-2000:] + logs[-3000:]
    assert "total 2" in logs  # OpenCLIP's SLURM detection made a 2-process job
    assert_two_ranks_agree(logs)
    assert checkpoints(ws, "srun2") == ["epoch_1.pt"]


@pytest.mark.e2e
def test_one_node_script_with_torchrun_two_processes(ws, tmp_path):
    env = slurm_env(ws, tmp_path, "torchrun2", 29612)
    del env["SLURM_NTASKS"]  # one task (torchrun) that starts the processes
    result = subprocess.run(["bash", os.path.join(SCRIPTS, "train_1node.sbatch")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_two_ranks_agree(result.stdout + result.stderr)
    assert checkpoints(ws, "torchrun2") == ["epoch_1.pt"]
    assert not (tmp_path / "scontrol.log").exists()  # a finished run is not requeued


@pytest.mark.e2e
def test_sweep_script_runs_its_grid_point(ws, tmp_path):
    env = slurm_env(ws, tmp_path, "unused", 29613, SLURM_ARRAY_TASK_ID="7", SCRIPT_DIR=SCRIPTS)
    del env["SLURM_NTASKS"], env["NAME"]
    result = subprocess.run(["bash", os.path.join(SCRIPTS, "sweep.sbatch")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # task 7 of LAMBDAS (0 0.25 0.5 1) × CONCEPT_SETS (background texture all): λ 0.5, texture
    assert "--starft-lambda 0.5 --starft-concepts texture" in result.stdout
    assert_two_ranks_agree(result.stdout + result.stderr)
    params = open(os.path.join(ws["root"], "logs", "starft-sweep-lambda0.5-texture", "params.txt")).read()
    assert "starft_lambda: 0.5" in params and "starft_concepts: texture" in params
    outside = subprocess.run(["bash", os.path.join(SCRIPTS, "sweep.sbatch")], capture_output=True, text=True,
                             env=dict(env, SLURM_ARRAY_TASK_ID="12"))
    assert outside.returncode == 2 and "--array=0-11" in outside.stderr


FAKE_TORCHRUN = """#!/bin/bash
# torchrun stand-in: record the command line
printf '%s\\n' "$@" > "$FAKE_SLURM_DIR/torchrun.args"
"""


@pytest.mark.parametrize("recipe,expected", [
    ("recipe_imagenet_vitb16.sbatch", ["--model", "ViT-B-16-quickgelu", "--starft-lambda", "0.5", "--starft-schedule",
                                       "staircase", "--precision", "fp32", "--batch-size", "64", "--lr", "1e-5",
                                       "--wd", "0.1", "--warmup", "500", "--epochs", "10", "scale=(0.9,1.0)"]),
    ("recipe_imagenet_vitl14.sbatch", ["--model", "ViT-L-14", "--starft-lambda", "0.5", "--precision", "amp_bf16"]),
    ("recipe_flyp_imagenet_vitb16.sbatch", ["--model", "ViT-B-16-quickgelu", "--starft-lambda", "0", "--precision", "fp32"]),
    ("recipe_transfer.sbatch", ["--starft-classnames", "/data/mydata/shards/classnames.txt", "--starft-templates", "openai"]),
])
def test_recipes_launch_train_1node_with_their_flags(tmp_path, recipe, expected):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "torchrun").write_text(FAKE_TORCHRUN)
    (fake / "torchrun").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("GPUS", "DATA", "MODEL", "NAME", "EXTRA_ARGS")}
    env.update(PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", FAKE_SLURM_DIR=str(tmp_path), SCRIPT_DIR=SCRIPTS)
    result = subprocess.run(["bash", os.path.join(SCRIPTS, recipe)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "torchrun.args").read_text().split("\n")
    assert args[:5] == ["--standalone", "--nproc-per-node", args[2], "-m", "--"] and args[5] == "open_clip_starft.main"
    for flag, value in zip(expected[::2], expected[1::2]):
        assert args[args.index(flag) + 1] == value, (flag, args)
    if len(expected) % 2:
        assert expected[-1] in args
