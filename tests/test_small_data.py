"""The small-data BN experiment on real ELF files: its pinned configuration loads and trains end to end."""

from __future__ import annotations

import csv

import pytest

from embedder.bn_gate import CONVERGED, NO_RUNNING_STATS, UNCONVERGED
from tests.conftest import debian_family_files
from training import small_data

pytestmark = pytest.mark.usefixtures("one_thread")


# The gate needs 64+ calibration inputs from the training side (70 % of the files): ~150 files here.
FAMILIES = ("coreutils", "util-linux", "systemd")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "families.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for family, files in debian_family_files(FAMILIES, 60).items():
            w.writerows((p, family) for p in files)
    return path


def test_every_variant_trains_and_is_gated_on_the_pinned_input(manifest):
    data = small_data.executable_data(FAMILIES, 60, manifest, seed=0)
    # Loaded with the experiment's own configuration, whatever the training defaults are today.
    spec = small_data.experiment_config("executable").resolved().input_spec()
    assert data.x.shape[1:] == (spec.channels, spec.size, spec.size)
    assert sorted(data.labels) == sorted(FAMILIES)
    assert len(data.y) >= 120, "too few files on this machine for a 64-input calibration sample"
    rows = small_data.run(data, modality="executable", epochs=1, batch_size=16, lr=3e-3, log=lambda _m: None)
    names = [name for name, _ in small_data.VARIANTS]
    assert [r.variant for r in rows[: len(names)]] == names and len(rows) == len(names) + 1
    assert len({r.steps for r in rows}) == 1 and rows[0].steps > 0  # every variant saw the same batches
    for r in rows:
        assert r.verdict in (CONVERGED, UNCONVERGED) or r.variant == "none"
        assert 0.0 <= r.eval_mode_acc <= 1.0 and 0.0 <= r.train_mode_acc <= 1.0
    assert rows[names.index("none")].verdict == NO_RUNNING_STATS
