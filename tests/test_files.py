"""The one atomic writer (data.files): whole or nothing, per-process temporary names, a full disk in one
line, and merge-on-write that loses no key under concurrent writers."""
import errno
import json
import multiprocessing
import os
import time

import pytest

from open_clip_starft.data import files
from open_clip_starft.errors import StorageError


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    target = tmp_path / "record.json"
    files.write_json(str(target), {"a": 1})
    with pytest.raises(KeyError):
        with files.atomic_open(str(target)) as f:
            f.write('{"a": 2')
            raise KeyError("boom")
    assert json.loads(target.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["record.json"]


def _write_whole(path, k, start, names):
    """Process ``k``: once every writer is ready, write ``path`` whole 5 times (100 KiB of the letter k,
    in chunks with pauses, so that the writers overlap), recording the temporary names it wrote under."""
    start.wait()
    for _ in range(5):
        with files.atomic_path(path) as partial:
            names.put((k, os.getpid(), partial))
            with open(partial, "w") as f:
                for _ in range(25):
                    f.write(chr(ord("a") + k) * 4096)
                    f.flush()
                    time.sleep(0.001)


def test_writers_in_several_processes_never_share_a_partial_file_and_the_result_is_one_whole_write(tmp_path):
    """Three real processes write the same file at once: each under its own temporary name (one per
    process, carrying its pid), and the file is always one writer's whole content, never a mix; no
    temporary file is left."""
    ctx = multiprocessing.get_context("fork")
    path, start, names = str(tmp_path / "record.txt"), ctx.Barrier(3), ctx.Queue()
    workers = [ctx.Process(target=_write_whole, args=(path, k, start, names)) for k in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0, 0]  # a writer that lost its file to another fails here
    seen = [names.get(timeout=10) for _ in range(15)]
    by_process = {}
    for k, pid, partial in seen:
        by_process.setdefault(k, set()).add((pid, partial))
    assert sorted(by_process) == [0, 1, 2] and all(len(v) == 1 for v in by_process.values())  # one name a process
    pids_and_names = [next(iter(v)) for v in by_process.values()]
    assert len({pid for pid, _ in pids_and_names}) == 3 and len({name for _, name in pids_and_names}) == 3
    assert all(name.endswith(str(pid)) and files.PARTIAL in os.path.basename(name) for pid, name in pids_and_names)
    text = open(path).read()
    assert len(text) == 25 * 4096 and len(set(text)) == 1 and text[0] in "abc"  # one writer's whole write
    assert os.listdir(tmp_path) == ["record.txt"]


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 128 vs 64")])
def test_a_full_disk_is_one_line_naming_the_file(tmp_path, error):
    target = tmp_path / "epoch_2.pt"
    target.write_bytes(b"previous")
    with pytest.raises(StorageError) as e:
        with files.atomic_path(str(target)) as partial:
            with open(partial, "wb") as f:
                f.write(b"x" * 2**20)
            raise error
    message = str(e.value)
    assert "no space left on" in message and str(target) in message and "\n" not in message
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["epoch_2.pt"]


def _add_keys(path, start):
    for i in range(start, start + 20):
        files.merge_json(path, {str(i): i})


def test_merge_json_keeps_every_writer_s_keys(tmp_path):
    path = str(tmp_path / "zero_shot.json")
    workers = [multiprocessing.get_context("fork").Process(target=_add_keys, args=(path, k * 100)) for k in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(files.read_json(path)) == 60 and os.listdir(tmp_path) == ["zero_shot.json"]
    assert files.merge_json(path, lambda old: {k: v for k, v in old.items() if v < 100}) == {str(i): i for i in range(20)}
