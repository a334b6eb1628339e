"""The one atomic writer (data.files): whole or nothing, per-process temporary names, a full disk in one
line, and merge-on-write that loses no key under concurrent writers."""
import errno
import json
import multiprocessing
import os

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


def test_partial_names_are_unique_per_process(tmp_path):
    name = files.partial_name(str(tmp_path / "x.pt"))
    assert name.endswith(f"{files.PARTIAL}-{os.getpid()}") and files.PARTIAL in os.path.basename(name)


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
