"""Landed files follow the umask like any file the account writes; temp files stay private."""

from __future__ import annotations

import os
import stat

import pytest

from incremental_assets.landing import LocalLandingStore
from incremental_assets.landing.base import TEMP_SUFFIX
from tests.test_landing import SCHEMA, batches, sample


@pytest.fixture
def umask():
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600), (0o002, 0o664)])
def test_published_files_follow_the_umask_and_temp_files_are_private(tmp_path, umask, mask, mode):
    umask(mask)
    store = LocalLandingStore(tmp_path / "landing", create=True)
    staged = store.stage_slice("t", "p", "s", SCHEMA, batches(sample(7)), max_rows_per_file=4)
    temps = [p for p in (tmp_path / "landing").rglob("*") if p.name.endswith(TEMP_SUFFIX)]
    assert len(temps) == 2 and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in temps)
    files = staged.publish()
    assert len(files) == 2
    for path in (tmp_path / "landing" / "t" / "p").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    assert not [p for p in (tmp_path / "landing").rglob("*") if p.name.endswith(TEMP_SUFFIX)]
    for folder in (tmp_path / "landing" / "t", tmp_path / "landing" / "t" / "p"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask
