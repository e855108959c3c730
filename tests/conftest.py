"""Test configuration: point mammo_tf at the local mini-MIAS archive and a test cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
LOCAL_ARCHIVE = SHARED / "mini-mias" / "all-mias.tar.gz"

# Tests use the local archive (never the network) unless the caller chose another source.
os.environ.setdefault("MAMMO_TF_DATA", str(LOCAL_ARCHIVE))
os.environ.setdefault("MAMMO_TF_CACHE", str(Path.home() / ".keras" / "datasets"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def annotations():
    """The parsed mini-MIAS annotation table."""
    from mammo_tf.data import mias

    return mias.load_annotations()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of shared data sets beside the project."""
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED


@pytest.fixture
def film_and_broken_png(tmp_path) -> tuple[Path, Path]:
    """A mini-MIAS film (mdb005) copied into tmp_path and a truncated PNG beside it."""
    import shutil

    from mammo_tf.data import mias

    film = tmp_path / "film.pgm"
    shutil.copyfile(mias.fetch() / "mdb005.pgm", film)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return film, broken
