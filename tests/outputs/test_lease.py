"""OUT/_LEASE: one writer per output folder, on a local disk and in memory://."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from sage_stream.errors import OutputLockedError
from sage_stream.outputs import lease
from sage_stream.outputs.folder import OutputFolder


@pytest.fixture(params=["local", "memory"])
def folder(request, tmp_path, mem_url) -> OutputFolder:
    return OutputFolder(str(tmp_path / "out") if request.param == "local" else f"{mem_url}/out")


def plant(folder: OutputFolder, **holder) -> None:
    folder.write_json(lease.lease_url(folder), {"token": "someone-else", **holder})


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_writer_is_refused_in_one_line_naming_the_holder(folder):
    with lease.hold(folder), pytest.raises(OutputLockedError) as refused:
        lease.acquire(folder)
    line = str(refused.value)
    assert "\n" not in line
    assert f"host {socket.gethostname()}, pid {os.getpid()}, since 20" in line
    assert "--force-unlock" in line
    assert not folder.exists(lease.lease_url(folder))  # released when the block ended


def test_hold_is_reentrant_and_released_on_error(folder):
    with pytest.raises(RuntimeError), lease.hold(folder):
        with lease.hold(folder):  # a step inside `run`
            assert folder.exists(lease.lease_url(folder))
        raise RuntimeError("boom")
    assert not folder.exists(lease.lease_url(folder))
    with lease.hold(folder):  # free again
        pass


def test_a_live_holder_elsewhere_needs_force_unlock(folder):
    plant(folder, host="other-host", pid=1, started="2026-01-01T00:00:00Z")
    with pytest.raises(OutputLockedError, match="host other-host, pid 1, since 2026-01-01"):
        lease.acquire(folder)
    token = lease.acquire(folder, force_unlock=True)
    assert folder.read_json(lease.lease_url(folder))["token"] == token
    lease.release(folder, token)


def test_a_live_holder_on_this_host_is_refused(folder):
    plant(folder, host=socket.gethostname(), pid=os.getppid(), started="x")
    with pytest.raises(OutputLockedError, match=f"pid {os.getppid()}"):
        lease.acquire(folder)


def test_a_dead_holder_on_this_host_is_taken_over(folder, caplog):
    plant(folder, host=socket.gethostname(), pid=dead_pid(), started="x")
    token = lease.acquire(folder)
    assert folder.read_json(lease.lease_url(folder))["token"] == token
    assert "taking over the lease" in caplog.text
    lease.release(folder, token)


def test_an_unreadable_lease_is_an_unknown_holder(folder):
    folder.write_bytes(lease.lease_url(folder), b"\xff not json")
    with pytest.raises(OutputLockedError, match="holder unknown"):
        lease.acquire(folder)


def test_check_refuses_a_lease_taken_over_by_another_writer(folder):
    with lease.hold(folder):
        lease.check(folder)
        plant(folder, host="other-host", pid=7, started="now")
        with pytest.raises(OutputLockedError, match="no longer holds _LEASE.*other-host"):
            lease.check(folder)
    assert folder.read_json(lease.lease_url(folder))["host"] == "other-host"  # not ours to drop


def test_local_lease_is_created_exclusively(tmp_path):
    """Two creates race on O_EXCL: exactly one wins (the loser sees the file)."""
    folder = OutputFolder(str(tmp_path / "out"))
    body = json.dumps({"token": "a"}).encode()
    assert lease._create(folder, lease.lease_url(folder), body)
    assert not lease._create(folder, lease.lease_url(folder), body)
