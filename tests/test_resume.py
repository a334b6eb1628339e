"""Resuming and saving safely: settings compared with the checkpoint's (refused in one line unless
allowed; the history kept), ``--resume latest`` taking the furthest position, foreign or crafted
``--resume`` files in one line, a full disk during a save (params.txt: tests/test_hooks.py), one process
per run folder."""
import errno
import functools
import os
import time

import pytest
import torch

from open_clip_starft.errors import DataError, StorageError
from open_clip_starft.host import checkpoint as ckpt
from open_clip_starft.host.params import build_parser, starft_settings
from open_clip_starft.host.runlock import RunLock
from open_clip_starft.host.state import RunState
from open_clip_starft.tools.tiny_model import build_tiny_model
import runs
from runs import TINY_RUN_FLAGS, log_of, metric, run, run_process, train_args, workspace

one_line_error = functools.partial(runs.one_line_error, status=2)  # refusals exit 2


def state(**flags):
    args = build_parser().parse_args([f"--{k.replace('_', '-')}={v}" for k, v in flags.items()])
    return RunState(settings=starft_settings(args))


def training_checkpoint(epoch=1, **starft):
    model, _ = build_tiny_model(seed=0)
    return {"epoch": epoch, "name": "x", "state_dict": model.state_dict(), "optimizer": {}, "starft": starft}


# -- --resume latest -------------------------------------------------------------------------------
def test_resume_latest_takes_the_furthest_training_position(tmp_path):
    def touch(name, content=b"", age=0.0):
        path = tmp_path / name
        path.write_bytes(content)
        os.utime(path, (time.time() - age, time.time() - age))
        return str(path)

    def latest_with(epoch, batches_done=None, age=0.0):
        entry = {"batches_done": batches_done} if batches_done is not None else {}
        torch.save({"epoch": epoch, "state_dict": {}, "starft": entry}, tmp_path / ckpt.LATEST)
        os.utime(tmp_path / ckpt.LATEST, (time.time() - age, time.time() - age))

    touch("epoch_1.pt", age=30)
    latest_with(1, age=20)  # --save-most-recent's copy of epoch 1
    step = touch("epoch_1_step_3.pt", age=10)  # then a preemption 3 batches into epoch 2
    touch("tmp.pt")  # upstream's temporary name (natural sort would take it), and a partial save
    touch("epoch_9.pt.partial-123")
    assert ckpt.latest_checkpoint(str(tmp_path)) == step  # upstream: epoch_latest.pt (retrains 3 batches)
    latest_with(2, age=5)
    assert ckpt.latest_checkpoint(str(tmp_path)) == str(tmp_path / ckpt.LATEST)
    newest = touch("epoch_2.pt", age=0)  # the same position: the newer file
    assert ckpt.latest_checkpoint(str(tmp_path)) == newest
    (tmp_path / ckpt.LATEST).write_bytes(b"not a checkpoint")  # unreadable: no candidate (with a warning)
    assert ckpt.latest_checkpoint(str(tmp_path)) == newest
    assert ckpt.latest_checkpoint(str(tmp_path / "none")) is None


# -- disk full, params.txt ---------------------------------------------------------------------------
@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1088 vs 1024")])
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    previous = folder / "epoch_1.pt"
    ckpt.save_checkpoint(training_checkpoint(1), str(previous), state())
    before = previous.read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):  # writes part of the file, then the disk is full
        real_save(obj, f, *a, **kw)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
        raise failure

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    target = folder / "epoch_2.pt"
    with pytest.raises(StorageError) as error:
        ckpt.save_checkpoint(training_checkpoint(2), str(target), state())
    message = str(error.value)
    assert message.startswith("no space left on ") and f"writing {target} (needed more than" in message
    assert "\n" not in message
    assert sorted(os.listdir(folder)) == ["epoch_1.pt"]  # no partial file, no epoch_2.pt
    assert previous.read_bytes() == before


# -- foreign, crafted and corrupt --resume files ---------------------------------------------------------
class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PAYLOAD_MARK']}",))


def test_resume_files_that_are_no_checkpoint_are_refused_naming_them(tmp_path, monkeypatch):
    from open_clip_train.file_utils import pt_load
    mark = tmp_path / "payload-ran"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    good = training_checkpoint(1)
    crafted = tmp_path / "crafted.pt"
    torch.save({**good, "extra": Payload()}, crafted)
    text = tmp_path / "notes.pt"
    text.write_text("hello\n")
    cut = tmp_path / "cut.pt"
    torch.save(good, cut)
    cut.write_bytes(cut.read_bytes()[: os.path.getsize(cut) // 3])
    plain = tmp_path / "plain.pt"
    torch.save({"learning_rate": 0.1}, plain)
    for path, why in ((crafted, "needs code to load"), (text, "not a readable training checkpoint"),
                      (cut, "not a readable training checkpoint"), (plain, "neither a training checkpoint")):
        with pytest.raises(DataError) as error:
            ckpt.load_resume(pt_load, str(path))
        assert str(error.value).startswith(f"--resume {path} ") and why in str(error.value), str(error.value)
        assert "\n" not in str(error.value)
    assert not mark.exists()  # the crafted pickle's command never ran

    def out_of_memory(path, map_location=None):  # what torch raised for one corrupt checkpoint
        raise MemoryError()
    with pytest.raises(DataError, match=f"--resume {cut} is not a readable training checkpoint \\(MemoryError"):
        ckpt.load_resume(out_of_memory, str(cut))


def test_a_resume_file_of_another_architecture_is_refused_naming_both(tmp_path):
    model, _ = build_tiny_model(seed=0)
    other, _ = build_tiny_model(seed=0, image_size=64)
    for weights in (training_checkpoint(1), {f"module.{k}": v for k, v in model.state_dict().items()}):
        ckpt.check_fits(model, weights, "x.pt", "tiny")  # fits (DDP's prefixes ignored)
    with pytest.raises(DataError) as error:
        ckpt.check_fits(model, other.state_dict(), "other.pt", "local-dir:tiny")
    assert str(error.value).startswith("--resume other.pt does not fit --model local-dir:tiny: 0 weight(s) missing, "
                                       "0 unexpected, 1 of another shape (e.g. 'visual.positional_embedding' [65, 64] "
                                       "vs [17, 64])")


# -- one process per run folder, read-only logs --------------------------------------------------------
@pytest.mark.e2e  # the first run holds the folder from a real process
def test_a_second_run_on_the_same_folder_is_refused_while_the_first_holds_it(small_data, tmp_path):
    ws = workspace(small_data, tmp_path)
    lock = RunLock(os.path.join(ws["root"], "logs", "busy"))
    lock.acquire()  # this test process stands for the first run; the second is another process
    try:
        result = run_process(train_args(ws, "busy", "--resume", "latest", epochs=1))
        one_line_error(result, f"the run folder {os.path.join(ws['root'], 'logs', 'busy')} is in use by another "
                               f"training process (pid {os.getpid()})", "another --name")
        assert sorted(os.listdir(os.path.join(ws["root"], "logs", "busy"))) == ["train.lock"]  # nothing written
    finally:
        lock.release()
    assert run(train_args(ws, "busy", "--resume", "latest", epochs=1)).returncode == 0  # free again


def test_a_dead_runs_data_loader_workers_are_waited_for_not_named_as_the_holder(tmp_path, monkeypatch):
    """After ``kill -9`` of a run, its forked data-loader workers still share its lock until they exit: a resume
    started at once waits for them (``ORPHAN_WAIT_S``) instead of refusing with the dead run's pid."""
    from open_clip_starft.host import runlock
    folder = str(tmp_path / "run")
    ready_r, ready_w = os.pipe()
    run_pid = os.fork()
    if run_pid == 0:  # the run: takes the lock, forks a worker that outlives it by 1.5 s, dies
        try:
            RunLock(folder).acquire()
            if os.fork() == 0:
                time.sleep(1.5)
                os._exit(0)
            os.write(ready_w, b"x")
        finally:
            os._exit(0)
    assert os.read(ready_r, 1) == b"x"
    os.waitpid(run_pid, 0)  # the run is gone; its worker holds the lock
    monkeypatch.setattr(runlock, "ORPHAN_WAIT_S", 0, raising=False)
    with pytest.raises(Exception, match=rf"in use by another training process \(pid {run_pid}, exited; its child "
                                        "processes still hold it\)"):
        RunLock(folder).acquire()
    monkeypatch.setattr(runlock, "ORPHAN_WAIT_S", 30, raising=False)
    start = time.monotonic()
    lock = RunLock(folder)
    lock.acquire()  # once the worker exits
    lock.release()
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("refused,message", [
    ("", "cannot write to the run folder {run}: Read-only file system"),  # the run folder itself (our lock)
    ("checkpoints", "cannot write {run}/checkpoints: Read-only file system: choose a --logs folder"),  # upstream's
])
def test_a_read_only_logs_folder_is_one_line(small_data, tmp_path, monkeypatch, refused, message):
    ws = workspace(small_data, tmp_path)
    run_folder = os.path.join(ws["root"], "logs", "ro")
    logs = os.path.join(run_folder, refused).rstrip("/")  # writes under this path fail as on a read-only mount
    real_makedirs, real_open = os.makedirs, os.open

    def refuse(path):
        if os.path.abspath(path).startswith(logs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    monkeypatch.setattr(os, "makedirs", lambda path, *a, **kw: (refuse(path), real_makedirs(path, *a, **kw))[1])
    monkeypatch.setattr(os, "open", lambda path, *a, **kw: (refuse(path), real_open(path, *a, **kw))[1])
    one_line_error(run(train_args(ws, "ro", epochs=1)), message.format(run=run_folder))


# -- settings compared on resume ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory):
    """The session's finished run (2 epochs of 64 samples at batch 32: 2 steps an epoch; ``TINY_RUN_FLAGS``),
    a mid-epoch checkpoint made from its epoch_1.pt, and a workspace of this module's own for the runs
    that resume them."""
    ws = workspace(tiny_run, tmp_path_factory.mktemp("resume"))
    folder = os.path.dirname(tiny_run["checkpoints"][0])
    mid = torch.load(os.path.join(folder, "epoch_1.pt"), weights_only=True)
    mid["starft"]["batches_done"] = 1
    torch.save(mid, os.path.join(ws["root"], "epoch_1_step_1.pt"))
    return ws, folder


def test_resuming_with_other_settings_is_refused_naming_each_difference(trained):
    ws, folder = trained
    epoch_1 = os.path.join(folder, "epoch_1.pt")
    result = run(train_args(ws, "changed", "--resume", epoch_1, "--starft-lambda", "4", "--starft-schedule", "constant",
                            "--starft-concepts", "background", "--batch-size", "16", epochs=3))
    last = one_line_error(result, f"--resume {epoch_1} was trained with other settings: ",
                          "--starft-allow-changed-settings")
    assert "--starft-concepts texture → background; --starft-lambda 0.7 → 4.0; --starft-schedule linear → constant; " \
           "--epochs 2 → 3: " in last
    assert "--batch-size" not in last  # at an epoch's end another batch size skips no sample
    mid = os.path.join(ws["root"], "epoch_1_step_1.pt")
    one_line_error(run(train_args(ws, "batch", "--resume", mid, *TINY_RUN_FLAGS, "--batch-size", "16", epochs=2)),
                   f"--resume {mid} was trained with other settings: --batch-size 32 → 16: ")


def test_resuming_a_finished_checkpoint_with_fewer_epochs_is_refused(trained):
    ws, folder = trained
    epoch_2 = os.path.join(folder, "epoch_2.pt")
    one_line_error(run(train_args(ws, "fewer", "--resume", epoch_2, "--starft-allow-changed-settings", epochs=1)),
                   f"--resume {epoch_2} has 2 epoch(s) done: nothing is left to train with --epochs 1")


def test_allowed_changes_are_trained_and_recorded_in_the_history(trained):
    ws, folder = trained
    args = train_args(ws, "allowed", "--resume", os.path.join(folder, "epoch_1.pt"), *TINY_RUN_FLAGS, "--starft-lambda", "4",
                      "--starft-schedule", "constant", "--starft-allow-changed-settings", epochs=3)
    result = run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    log = log_of(ws, "allowed")
    assert "continuing" in log and "with changed settings: --starft-lambda 0.7 → 4.0; --starft-schedule linear → constant" in log
    assert metric(log, "Step") == [2, 3, 4, 5] and metric(log, "Star lambda") == [4.0] * 4
    entry = torch.load(os.path.join(ws["root"], "logs", "allowed", "checkpoints", "epoch_3.pt"), weights_only=True)["starft"]
    assert entry["starft_lambda"] == 4.0 and "starft_allow_changed_settings" not in entry
    first, second = entry["history"]
    assert (first["step"], first["epochs"], first["batch_size"], first["settings"]["starft_lambda"]) == (0, 2, 32, 0.7)
    assert (second["epoch"], second["step"], second["epochs"], second["settings"]["starft_lambda"],
            second["settings"]["starft_schedule"]) == (1, 2, 3, 4.0, "constant")
    same = run(train_args(ws, "same", "--resume", os.path.join(folder, "epoch_1.pt"), *TINY_RUN_FLAGS, epochs=2))
    assert same.returncode == 0, same.stderr[-3000:]  # unchanged settings: no new history entry
    entry = torch.load(os.path.join(ws["root"], "logs", "same", "checkpoints", "epoch_2.pt"), weights_only=True)["starft"]
    assert len(entry["history"]) == 1


def test_a_crafted_resume_file_is_one_line_through_the_entry_point(trained, tmp_path):
    ws, folder = trained
    mark = tmp_path / "payload-ran"
    crafted = tmp_path / "crafted.pt"
    os.environ["PAYLOAD_MARK"] = str(mark)
    try:
        torch.save({**torch.load(os.path.join(folder, "epoch_1.pt"), weights_only=True), "extra": Payload()}, crafted)
    finally:
        del os.environ["PAYLOAD_MARK"]
    one_line_error(run(train_args(ws, "crafted", "--resume", str(crafted), epochs=2)),
                   f"--resume {crafted} is not a readable training checkpoint (it needs code to load")
    assert not mark.exists()
