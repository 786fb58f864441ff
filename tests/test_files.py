"""files.py: atomic_file writes whole files or none, and folder_lock lets one process at a time use an output folder,
released when the process ends however it ends (kill -9 included)."""
import json
import os
import signal
import subprocess
import sys

import pytest

import files
from conftest import ROOT

HOLD = """
import sys, time
sys.path.insert(0, {root!r})
import files
with files.folder_lock(sys.argv[1], "train"):
    print("holding", flush=True)
    time.sleep(600)
"""


def hold_lock(folder):
    """A process that holds folder_lock(folder) until it is killed; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(root=ROOT), str(folder)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "holding\n"
    return proc


@pytest.mark.slow
def test_a_second_process_is_refused_naming_the_first_and_gets_the_folder_after_a_kill_9(tmp_path):
    holder = hold_lock(tmp_path / "out")
    try:
        with pytest.raises(files.FolderBusy) as e:
            with files.folder_lock(str(tmp_path / "out"), "train"):
                pytest.fail("two holders")
        message = str(e.value)
        assert f"PID {holder.pid}, rmd train started" in message and "another --out" in message
        assert "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with files.folder_lock(str(tmp_path / "out"), "distill"):  # the kernel dropped the dead process's lock
        with open(tmp_path / "out" / files.LOCK_NAME) as f:
            assert json.load(f)["pid"] == os.getpid()


@pytest.mark.slow
def test_the_lock_is_reentrant_in_a_process_and_released_at_the_end_of_the_block(tmp_path):
    folder = str(tmp_path / "out")
    with files.folder_lock(folder, "train"):
        with files.folder_lock(folder, "train"):  # the demo locks --out, then train() does again
            pass
        code = f"import sys; sys.path.insert(0, {ROOT!r}); import files\nwith files.folder_lock({folder!r}, 'x'): pass"
        assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 1  # still held
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_atomic_file_keeps_the_old_file_when_the_block_fails(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic_file(str(path)) as f:
            f.write("half of the new")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["a.json"]


def test_the_command_line_says_a_busy_folder_in_one_line():
    import cli
    with pytest.raises(SystemExit) as e:
        with cli.one_line_errors():
            raise files.FolderBusy("out/train is in use by another run (PID 1, rmd train started x)")
    assert str(e.value.code) == "error: out/train is in use by another run (PID 1, rmd train started x)"
