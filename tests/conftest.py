"""Shared fixtures: small mirrors built once per session with tasks.mirror (never hand-made archives)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from tasks.config import load_section
from tasks.mirror import Fault, MirrorParams, MirrorResult, build_mirror

REPO = Path(__file__).resolve().parent.parent


def mirror_params(**changes) -> MirrorParams:
    overrides = [f"mirror.{k}={v}" for k, v in changes.items()]
    return load_section("mirror", MirrorParams, overrides=overrides)


def extract(archive: Path, dest: Path) -> Path:
    """Extract a trusted test archive and return its single top folder."""
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    (top,) = dest.iterdir()
    return top


@pytest.fixture(scope="session")
def small_mirror(tmp_path_factory) -> MirrorResult:
    out = tmp_path_factory.mktemp("small_mirror")
    return build_mirror(out=out, params=mirror_params(patches=40, seed=5), workers=1)


@pytest.fixture(scope="session")
def faulty_mirror(tmp_path_factory) -> MirrorResult:
    """A mirror with every kind of fault injected once."""
    out = tmp_path_factory.mktemp("faulty_mirror")
    return build_mirror(out=out, params=mirror_params(patches=40, seed=6), faults=dict.fromkeys(Fault, 1), workers=1)


@pytest.fixture(scope="session")
def small_mirror_root(small_mirror, tmp_path_factory) -> Path:
    return extract(small_mirror.archive, tmp_path_factory.mktemp("small_mirror_root"))


@pytest.fixture(scope="session")
def faulty_mirror_root(faulty_mirror, tmp_path_factory) -> Path:
    return extract(faulty_mirror.archive, tmp_path_factory.mktemp("faulty_mirror_root"))
