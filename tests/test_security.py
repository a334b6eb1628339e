"""Nothing runs from a crafted file: every command that reads a checkpoint refuses one whose unpickling
would call code (the payload below writes a marker file; it must never appear), in one line naming the
file and the fix, and loads it only with --trust-checkpoint; corrupt checkpoints are one line naming the
file; CIFAR-10's pickled batch is read by a restricted unpickler. (Real training checkpoints loading
weights-only: tests/test_export.py exports and evaluates one without --trust-checkpoint.)"""
import os
import pickle

import numpy as np
import pytest
import torch

from open_clip_starft.demo.data import CLASSNAMES, brace_pattern, write_shards
from open_clip_starft.errors import DataError, StarftError
from open_clip_starft.eval import cli as eval_cli, wise
from open_clip_starft.eval.models import UntrustedCheckpoint, checkpoint_state, local_dir_weights, read_checkpoint
from open_clip_starft.eval.sets import EvalSetSpec, prepare_set
from open_clip_starft.eval.sets.cifar import read_cifar_batch
from studies.waterbirds_lite.benchmark import Evaluator as WaterbirdsEvaluator
from open_clip_starft.tools import export
from open_clip_starft.tools.sweep import WeightsScorer as SweepEvaluator
from open_clip_starft.tools.tiny_model import build_tiny_model, write_tiny_model


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file exists exactly when the pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class Shell:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny model, a shard set, a run folder whose epoch_1.pt is a training checkpoint (state dict with
    DDP prefix, epoch, name, optimizer, StarFT settings) plus one crafted object, and a clean copy."""
    root = tmp_path_factory.mktemp("security")
    model = write_tiny_model(str(root / "zs"), seed=0)
    shards = brace_pattern(write_shards(str(root / "shards"), 8, seed=1, image_size=32, samples_per_shard=8))
    names = root / "names.txt"
    names.write_text("\n".join(CLASSNAMES) + "\n")
    run = root / "logs" / "ft"
    os.makedirs(run / "checkpoints")
    (run / "params.txt").write_text(f"batch_size: 8\nepochs: 1\nmodel: {model}\ntrain_data: {shards}\n")
    tuned, _ = build_tiny_model(seed=1)
    checkpoint = {"epoch": 1, "name": "ft", "state_dict": {"module." + k: v for k, v in tuned.state_dict().items()},
                  "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
                  "starft": {"starft_lambda": 0.5, "starft_schedule": "constant"}}
    clean = root / "clean.pt"
    torch.save(checkpoint, clean)
    marker = root / "marker"
    crafted = run / "checkpoints" / "epoch_1.pt"
    torch.save({**checkpoint, "notes": Payload(marker)}, crafted)
    return {"root": root, "model": model, "shards": shards, "names": str(names), "run": str(run), "clean": str(clean),
            "crafted": str(crafted), "marker": marker, "tuned": tuned.state_dict()}


def eval_set_args(ws, out):
    return ["--data", ws["shards"], "--classnames", ws["names"], "--workers", "0", "--no-progress", "--no-plots",
            "--out", str(out)]


def commands(ws, tmp):
    """Every command that reads a checkpoint, pointed at the crafted one: (name, main, argv)."""
    crafted, model = ws["crafted"], ws["model"]
    return [
        ("export", export.main, ["--checkpoint", crafted, "--out", str(tmp / "exported")]),
        ("eval --pretrained", eval_cli.main, ["--model", model, "--pretrained", f"ft={crafted}", *eval_set_args(ws, tmp / "p.jsonl")]),
        ("eval --run", eval_cli.main, ["--run", ws["run"], *eval_set_args(ws, tmp / "r.jsonl")]),
        ("wise --fine-tuned", wise.main, ["--model", model, "--fine-tuned", crafted, "--alphas", "0,1",
                                          *eval_set_args(ws, tmp / "wise-ft")[:-2], "--out", str(tmp / "wise-ft")]),
        ("wise --zero-shot", wise.main, ["--model", model, "--zero-shot", crafted, "--fine-tuned", ws["clean"], "--alphas", "0,1",
                                         *eval_set_args(ws, tmp / "wise-zs")[:-2], "--out", str(tmp / "wise-zs")]),
    ]


def test_every_command_refuses_a_crafted_checkpoint_and_the_payload_never_runs(ws, tmp_path, capsys):
    for name, main, argv in commands(ws, tmp_path):
        rc = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, (name, err)
        line = err[0]
        assert line.startswith("open-clip-starft: error: ") and ws["crafted"] in line, (name, line)
        assert "refused" in line and "io.open" in line and "--trust-checkpoint" in line, (name, line)
        assert not ws["marker"].exists(), name
    assert not (tmp_path / "exported").exists()


def test_the_loaders_sweep_and_waterbirds_lite_use_refuse_it_too(ws):
    with pytest.raises(UntrustedCheckpoint, match="io.open"):
        SweepEvaluator(ws["model"], ws["crafted"], {}, ws["names"])  # sweep's zero-shot weights
    evaluator = SweepEvaluator(ws["model"], None, {}, ws["names"])
    with pytest.raises(UntrustedCheckpoint, match="epoch_1.pt"):
        evaluator.state_dict(ws["crafted"])  # sweep's reuse of a finished run's checkpoint
    clean = evaluator.state_dict(ws["clean"])
    assert all(torch.equal(clean[k], v) for k, v in ws["tuned"].items())
    with pytest.raises(UntrustedCheckpoint):
        WaterbirdsEvaluator.state_of(None, ws["crafted"])  # waterbirds-lite's checkpoint reader (no state used)
    assert not ws["marker"].exists()


def test_trust_checkpoint_loads_the_users_own_file(ws, tmp_path, capsys):
    for name, main, argv in commands(ws, tmp_path):
        assert main([*argv, "--trust-checkpoint"]) == 0, (name, capsys.readouterr().err[-500:])
        assert ws["marker"].exists(), name  # it was unpickled: the payload ran, as the user allowed
        ws["marker"].unlink()
    state, meta = checkpoint_state(ws["crafted"], trust=True)
    assert meta["epoch"] == 1 and all(torch.equal(state[k], v) for k, v in ws["tuned"].items())
    ws["marker"].unlink()


def test_other_payloads_and_torchscript_are_refused(ws, tmp_path):
    touched = tmp_path / "touched"
    torch.save({"state_dict": ws["tuned"], "x": Shell(touched)}, tmp_path / "shell.pt")
    with pytest.raises(UntrustedCheckpoint, match=r"shell\.pt was refused: loading it would call posix\.system"):
        read_checkpoint(str(tmp_path / "shell.pt"))
    assert not touched.exists()
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    torch.jit.save(scripted, str(tmp_path / "scripted.pt"))
    with pytest.raises(UntrustedCheckpoint, match="TorchScript archive"):
        read_checkpoint(str(tmp_path / "scripted.pt"))


def test_safetensors_and_openclip_state_dicts_load_weights_only(ws, tmp_path):
    weights = local_dir_weights(ws["model"])
    assert weights.endswith(".safetensors")
    state, meta = checkpoint_state(weights)
    assert meta == {} and state.keys() == ws["tuned"].keys()
    torch.save(ws["tuned"], tmp_path / "open_clip_pytorch_model.bin")  # OpenCLIP's released layout: a bare state dict
    bare, _ = checkpoint_state(str(tmp_path / "open_clip_pytorch_model.bin"))
    assert all(torch.equal(bare[k], v) for k, v in ws["tuned"].items())


def test_corrupt_checkpoints_are_one_line_naming_the_file(ws, tmp_path, capsys):
    raw = open(ws["clean"], "rb").read()
    weights = open(local_dir_weights(ws["model"]), "rb").read()
    cases = {"truncated.pt": raw[: len(raw) // 2], "garbage.pt": bytes(range(256)) * 20, "empty.pt": b"",
             "plain-pickle.pt": pickle.dumps({"a": 1}, protocol=4), "cut.safetensors": weights[:100],
             "not-weights.pt": None}
    torch.save({"state_dict": {"a": "text"}}, tmp_path / "not-weights.pt")
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        rc = eval_cli.main(["--model", ws["model"], "--pretrained", str(tmp_path / name), *eval_set_args(ws, tmp_path / "r.jsonl")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and str(tmp_path / name) in err[0], (name, err)
        assert "Traceback" not in err[0] and len(err[0]) < 400, (name, err[0])
    with pytest.raises(DataError, match="is empty"):
        read_checkpoint(str(tmp_path / "empty.pt"))
    with pytest.raises(DataError, match="holds no state dict"):
        checkpoint_state(str(tmp_path / "not-weights.pt"))


# -- CIFAR-10's pickled test batch -------------------------------------------------------------
def _cifar_root(root, batch: dict, protocol=2):
    os.makedirs(root / "cifar-10-batches-py")
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump(batch, f, protocol=protocol)
    rng = np.random.default_rng(1)
    np.savez(root / "cifar102_test.npz", images=rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), labels=np.array([7, 8, 9]))
    return root


def test_cifar_batches_are_read_by_a_restricted_unpickler(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (5, 3072), dtype=np.uint8)
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": [3, 1, 4, 1, 5], b"data": data,
             b"filenames": [f"{i}.png".encode() for i in range(5)]}  # the release's keys, as Python 2 wrote them
    root = _cifar_root(tmp_path / "bytes-keys", batch)
    got, labels = read_cifar_batch(str(root / "cifar-10-batches-py" / "test_batch"))
    assert np.array_equal(got, data) and labels == [3, 1, 4, 1, 5]
    prepared = prepare_set(EvalSetSpec(name="c", root=str(root)))
    first = prepared.items[0]
    assert first.label == 3 and first.group == 0 and np.array_equal(first.ref, data[0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert [it.label for it in prepared.items] == [3, 1, 4, 1, 5, 7, 8, 9]
    str_keys = _cifar_root(tmp_path / "str-keys", {"data": data, "labels": [3, 1, 4, 1, 5]}, protocol=4)
    assert np.array_equal(read_cifar_batch(str(str_keys / "cifar-10-batches-py" / "test_batch"))[0], data)

    marker = tmp_path / "marker"
    crafted = _cifar_root(tmp_path / "crafted", {**batch, b"x": Payload(marker)})
    with pytest.raises(StarftError, match=r"eval set 'c': .*test_batch is not a CIFAR-10 python batch, refused .*io\.open"):
        prepare_set(EvalSetSpec(name="c", root=str(crafted), format="cifar10.02"))
    assert not marker.exists()
    shell = _cifar_root(tmp_path / "shell", {**batch, b"x": Shell(marker)})
    with pytest.raises(DataError, match="posix.system"):
        read_cifar_batch(str(shell / "cifar-10-batches-py" / "test_batch"))
    assert not marker.exists()
    odd = _cifar_root(tmp_path / "odd", {b"data": data[:, :100], b"labels": [0] * 5})
    with pytest.raises(DataError, match=r"no uint8 'data' \[N, 3072\]"):
        read_cifar_batch(str(odd / "cifar-10-batches-py" / "test_batch"))


def test_a_local_dir_models_own_weights_go_through_the_same_reader(ws, tmp_path, capsys):
    folder = tmp_path / "crafted-model"
    folder.mkdir()
    config = os.path.join(ws["model"].removeprefix("local-dir:"), "open_clip_config.json")
    (folder / "open_clip_config.json").write_bytes(open(config, "rb").read())
    torch.save({"state_dict": ws["tuned"], "notes": Payload(ws["marker"])}, folder / "open_clip_pytorch_model.bin")
    argv = ["--model", f"local-dir:{folder}", *eval_set_args(ws, tmp_path / "r.jsonl")]
    assert eval_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "open_clip_pytorch_model.bin was refused" in err[0] and "--trust-checkpoint" in err[0]
    assert not ws["marker"].exists()
    assert wise.main(["--model", f"local-dir:{folder}", "--fine-tuned", ws["clean"], "--alphas", "0,1",
                      *eval_set_args(ws, tmp_path / "w")]) == 2
    assert "open_clip_pytorch_model.bin was refused" in capsys.readouterr().err and not ws["marker"].exists()
    assert eval_cli.main([*argv, "--trust-checkpoint"]) == 0  # the user's own folder, explicitly trusted
    assert ws["marker"].exists()
    ws["marker"].unlink()
