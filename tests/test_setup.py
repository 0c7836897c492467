"""tasks.py, the set-up both README commands go through."""

import shutil
from collections import namedtuple

import tasks

Usage = namedtuple("Usage", "total used free")


def test_a_short_disk_is_named_before_pip_fails_half_way(monkeypatch, capsys):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**11, 10**11 - 2 * 10**9, 2 * 10**9))
    tasks.warn_if_disk_is_short(tasks.VENV_DISK_BYTES)
    assert "2.0 GB free" in capsys.readouterr().err

    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**11, 0, 10**11))
    tasks.warn_if_disk_is_short(tasks.VENV_DISK_BYTES)
    assert capsys.readouterr().err == ""
