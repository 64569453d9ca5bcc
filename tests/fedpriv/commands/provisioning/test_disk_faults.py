"""Provisioning on a full or read-only disk: the kits are written as one change, never a CA key alone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedpriv.cli import main
from fedpriv.commands.provisioning import ProvisioningError, pki
from fedpriv.commands.provisioning.federation import load_federation
from fedpriv.commands.provisioning.kits import provision
from fedpriv.kernel.errors import DiskError
from tests.disk_faults import fill, tmpfs

from .conftest import snapshot


def _ca_pair_matches(out: Path) -> bool:
    key = pki.load_private_key(out / "coordinator-ca" / "ca.key")
    return pki.same_public_key(key.public_key(), pki.load_cert(out / "coordinator" / "ca.crt").public_key())


def test_a_full_disk_leaves_no_kit_file_and_a_later_provision_succeeds(tmp_path, federation_file, capsys):
    with tmpfs(tmp_path / "disk", size="512k") as disk:
        out = disk / "kits"
        filler = fill(disk, leave=16384)  # room for a few key files, not for the kits
        assert main(["provision", str(federation_file), "--out", str(out), "--make-org-keys"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: cannot write {out}/") and err.endswith(": [Errno 28] No space left on device")
        assert "\n" not in err
        assert not out.exists() or snapshot(out) == {}  # never a ca.key (or anything) without its certificate
        filler.unlink()  # space freed: the same command now makes the whole kits
        assert main(["provision", str(federation_file), "--out", str(out), "--make-org-keys"]) == 0
        assert (
            _ca_pair_matches(out)
            and (out / "hospital-b" / "ca.crt").read_bytes() == (out / "coordinator" / "ca.crt").read_bytes()
        )


def test_a_full_disk_during_an_update_leaves_the_kits_as_they_were(tmp_path, federation_file):
    with tmpfs(tmp_path / "disk", size="512k") as disk:
        out = disk / "kits"
        cfg = load_federation(federation_file)
        provision(cfg, out, make_org_keys=True)
        (out / "hospital-a" / "README.txt").unlink()
        (out / "hospital-b" / "node.pub").unlink()
        before = snapshot(out)
        fill(disk)
        with pytest.raises(DiskError, match=r"\[Errno 28\] No space left on device$"):
            provision(cfg, out, make_org_keys=True)
        assert snapshot(out) == before
        assert sorted(p.name for p in out.rglob(".*")) == []  # no temporary file left behind


def test_a_read_only_kits_folder_is_one_line(tmp_path, federation_file, capsys):
    with tmpfs(tmp_path / "ro", size="64k", read_only=True) as folder:
        assert main(["provision", str(federation_file), "--out", str(folder / "kits"), "--make-org-keys"]) == 2
        err = capsys.readouterr().err.strip()
        assert re.fullmatch(rf"error: cannot write {folder / 'kits'}/\S+: \[Errno 30\] Read-only file system", err)


def _half_written(kits: Path) -> None:
    """What an earlier fedpriv left on a full disk: the CA and SuperLink keys, no certificate anywhere."""
    for path in sorted(kits.rglob("*"), reverse=True):
        if path.is_file() and path.name not in ("ca.key", "superlink.key"):
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def test_a_ca_key_left_without_any_certificate_gets_its_certificate_for_the_same_key(kits, federation_file, capsys):
    _half_written(kits)
    key_before = (kits / "coordinator-ca" / "ca.key").read_bytes()
    assert main(["provision", str(federation_file), "--out", str(kits), "--make-org-keys"]) == 0
    assert "issued for the existing" in capsys.readouterr().out
    assert (kits / "coordinator-ca" / "ca.key").read_bytes() == key_before  # the key is never replaced
    assert _ca_pair_matches(kits)
    ca = pki.load_cert(kits / "coordinator" / "ca.crt")
    assert pki.signed_by(pki.load_cert(kits / "coordinator" / "superlink.crt"), ca)


def test_no_repair_once_a_certificate_of_the_ca_was_handed_out(kits, federation_file):
    handed_out = (kits / "hospital-a" / "ca.crt").read_bytes()
    _half_written(kits)
    (kits / "hospital-a").mkdir(exist_ok=True)
    (kits / "hospital-a" / "ca.crt").write_bytes(handed_out)  # an organisation's kit already trusts the CA
    with pytest.raises(ProvisioningError, match=r"coordinator/ca\.crt: missing but .*ca\.key exists"):
        provision(load_federation(federation_file), kits, make_org_keys=True)
