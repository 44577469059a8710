"""Crash windows of ``atomic_directory``: a save that fails or dies at any step never loses the adapter.

Failures are injected into the file-system calls a save makes (``os.rename``,
``shutil.rmtree``, ``os.fsync``) at the k-th call, for every k: either once
(an exception the save handles) or from the k-th call on (a process that
dies there: nothing it would do afterwards reaches the disk).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors import SafetensorError

import peftkit
import peftkit.serialization as serialization
from peftkit.errors import SaveError
from peftkit.serialization import atomic_directory, recover_directory
from peftkit.testing import sample_batch, tiny_llama, train_steps

FAULT_POINTS = [(os, "rename"), (shutil, "rmtree"), (os, "fsync")]


class InjectedFault(OSError):
    pass


@pytest.fixture
def two_versions(tmp_path):
    """A tuned model saved at ``path`` (version A), then trained further in memory (version B)."""
    tuned = peftkit.wrap(tiny_llama(), "lora", r=2, target_modules=["q_proj", "v_proj"])
    train_steps(tuned, sample_batch())
    path = tmp_path / "adapter"
    tuned.save(path)
    version_a = _clone(tuned.adapter_state_dict())
    train_steps(tuned, sample_batch(seed=5))
    version_b = _clone(tuned.adapter_state_dict())
    assert not _same(version_a, version_b)
    return tuned, path, version_a, version_b


def _clone(state):
    return {k: v.detach().clone() for k, v in state.items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _loaded(path):
    return _clone(peftkit.load(tiny_llama(), path).adapter_state_dict())


def _config(path):
    """The config ``write_adapter`` was given for ``path`` (to write other tensors under it)."""
    config = json.loads((path / serialization.CONFIG_NAME).read_text())
    return {k: v for k, v in config.items() if k not in {"format_version", "peftkit_version", "weights_sha256"}}


def _save_with_fault(monkeypatch, tuned, path, module, name, k, *, dies):
    """Save with the k-th call of ``module.name`` failing; return how many calls the save made."""
    real = getattr(module, name)
    calls = 0

    def faulty(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == k or (dies and calls > k):
            raise InjectedFault(f"injected fault in {name} call {calls}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, faulty)
    try:
        tuned.save(path)
    except OSError:
        pass
    finally:
        monkeypatch.setattr(module, name, real)
    return calls


@pytest.mark.parametrize("dies", [False, True], ids=["fails-once", "dies"])
@pytest.mark.parametrize("module,name", FAULT_POINTS, ids=[n for _, n in FAULT_POINTS])
def test_fault_at_every_call_leaves_old_or_new_adapter(two_versions, monkeypatch, module, name, dies):
    tuned, path, version_a, version_b = two_versions
    k = 1
    while _save_with_fault(monkeypatch, tuned, path, module, name, k, dies=dies) >= k:
        loaded = _loaded(path)
        assert _same(loaded, version_a) or _same(loaded, version_b), f"fault at {name} call {k}"
        tuned.save(path)  # the next save recovers and completes
        assert _same(_loaded(path), version_b)
        assert sorted(p.name for p in path.parent.iterdir()) == ["adapter"], f"residue after fault at {name} call {k}"
        serialization.write_adapter(path, _config(path), version_a)  # back to A on disk for the next k
        k += 1
    assert k > 1, f"a save never calls {name}: the fault point tests nothing"


def test_crash_between_renames_load_recovers_the_previous_adapter(two_versions, monkeypatch):
    tuned, path, version_a, _ = two_versions
    # Calls: path -> path.peftkit-old, then tmp -> path (dies there).
    _save_with_fault(monkeypatch, tuned, path, os, "rename", 2, dies=True)
    assert not path.exists() and (path.parent / "adapter.peftkit-old").is_dir()
    assert _same(_loaded(path), version_a)
    assert sorted(p.name for p in path.parent.iterdir()) == ["adapter"]


def test_second_crash_while_old_copy_waits_never_loses_it(two_versions, monkeypatch):
    tuned, path, version_a, version_b = two_versions
    k = 1
    while True:
        _save_with_fault(monkeypatch, tuned, path, os, "rename", 2, dies=True)  # leaves only adapter.peftkit-old
        assert not path.exists()
        if _save_with_fault(monkeypatch, tuned, path, os, "rename", k, dies=True) < k:
            break
        loaded = _loaded(path)
        assert _same(loaded, version_a) or _same(loaded, version_b), f"second crash at rename call {k}"
        serialization.write_adapter(path, _config(path), version_a)
        k += 1
    assert k > 2


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temp_dirs_of_dead_writers_are_removed_live_ones_kept(two_versions):
    tuned, path, _, _ = two_versions
    host = socket.gethostname()
    stale = path.parent / f".adapter.tmp-{_dead_pid()}@{host}-0badf00d"
    live = path.parent / f".adapter.tmp-{os.getppid()}@{host}-0000beef"  # our parent: alive, not us
    remote = path.parent / f".adapter.tmp-{_dead_pid()}@another-host-12345678"
    other_name = path.parent / f".checkpoint.tmp-{_dead_pid()}@{host}-12345678"
    for d in (stale, live, remote, other_name):
        d.mkdir()
        (d / "adapter.safetensors").write_bytes(b"partial")
    tuned.save(path)
    left = sorted(p.name for p in path.parent.iterdir())
    assert left == sorted(["adapter", live.name, remote.name, other_name.name])
    assert recover_directory(path.parent / "checkpoint") is False
    assert not other_name.exists()


def test_temp_dirs_an_older_peftkit_left_are_removed_once_an_hour_old(two_versions):
    tuned, path, _, _ = two_versions
    old_left_over = path.parent / ".adapter.tmp-k3j_x9a1"  # tempfile.mkdtemp's name, no pid: peftkit 0.1.0
    recent = path.parent / ".adapter.tmp-q8w2e7r4"
    for d in (old_left_over, recent):
        d.mkdir()
        (d / "adapter.safetensors").write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(old_left_over, (two_hours_ago, two_hours_ago))
    tuned.save(path)
    assert not old_left_over.exists()
    assert recent.exists(), "it may belong to an older peftkit saving right now"


def test_recover_directory_moves_old_copy_back_and_drops_obsolete_one(tmp_path):
    path = tmp_path / "checkpoint"
    old = tmp_path / "checkpoint.peftkit-old"
    assert recover_directory(path) is False  # nothing there: nothing to do
    old.mkdir()
    (old / "state.pt").write_bytes(b"old")
    assert recover_directory(path) is True
    assert (path / "state.pt").read_bytes() == b"old" and not old.exists()
    assert recover_directory(path) is False
    old.mkdir()
    (old / "state.pt").write_bytes(b"older")
    assert recover_directory(path) is False  # path is complete: the old copy is obsolete
    assert (path / "state.pt").read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


# ------------------------------------------------------------------ disk full
@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"),
    ],
    ids=["ENOSPC", "SafetensorError"],
)
def test_disk_full_while_writing_adapter_is_one_clear_error(two_versions, monkeypatch, error):
    tuned, path, version_a, _ = two_versions
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def full_disk(*args, **kwargs):
        raise error

    monkeypatch.setattr(serialization, "save_file", full_disk)
    with pytest.raises(SaveError) as info:
        tuned.save(path)
    text = str(info.value)
    assert str(path) in text and type(error).__name__ in text and f"the previous copy at {path} is intact" in text
    assert isinstance(info.value.__cause__, type(error))
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in path.parent.iterdir()] == ["adapter"], "no temporary directory is left behind"
    monkeypatch.undo()
    assert _same(_loaded(path), version_a)


def test_disk_full_names_the_cause_for_a_checkpoint_directory(tmp_path):
    path = tmp_path / "checkpoint"
    with pytest.raises(SaveError) as info:
        with atomic_directory(path) as tmp:
            (tmp / "state.pt").write_bytes(b"x")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")
    text = str(info.value)
    assert "inline_container.cc:672" in text and f"nothing was written at {path}" in text
    with pytest.raises(SaveError, match="the disk is full"):
        with atomic_directory(path):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_other_errors_inside_the_block_pass_through_unchanged(tmp_path):
    with pytest.raises(KeyError, match="bug"):
        with atomic_directory(tmp_path / "out"):
            raise KeyError("bug")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_inside_a_nested_save_reports_the_outer_directory(two_versions, monkeypatch, tmp_path):
    tuned, _, _, _ = two_versions
    checkpoint = tmp_path / "checkpoint"
    with atomic_directory(checkpoint) as tmp:
        (tmp / "state.pt").write_bytes(b"step 1")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(serialization, "save_file", full_disk)
    with pytest.raises(SaveError) as info:
        with atomic_directory(checkpoint) as tmp:  # as the trainer writes a checkpoint
            tuned.save(tmp / "adapter", training=True)
    text = str(info.value)
    assert text.startswith(f"could not save {checkpoint}: OSError") and f"the previous copy at {checkpoint} is intact" in text
    assert ".tmp-" not in text, "the temporary directory is no concern of the user"
    assert (checkpoint / "state.pt").read_bytes() == b"step 1"


_SAVER = """
import sys, torch, peftkit
from peftkit.testing import tiny_llama
tuned = peftkit.wrap(tiny_llama(), "lora", r=4, target_modules="all-linear")
print("ready", flush=True)
while True:  # save over and over, each time with other weights, until killed
    with torch.no_grad():
        for p in tuned.trainable_parameters():
            p.add_(0.01)
    tuned.save(sys.argv[1])
"""


@pytest.mark.slow
def test_savers_killed_at_random_points_leave_a_loadable_adapter_and_no_debris(tmp_path):
    import random
    import signal

    target = tmp_path / "adapter"
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(6):
        saver = subprocess.Popen([sys.executable, "-c", _SAVER, str(target)], stdout=subprocess.PIPE, env=env)
        assert saver.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.05, 1.0))
        saver.send_signal(signal.SIGKILL)
        saver.wait()
    peftkit.load(tiny_llama(), target)  # recovers whatever the last kill left, then loads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
