"""
The out-of-the-box demo: a synthetic chest CT whose lung volume is known
exactly, and lung functions whose answers the proxy accepts at every route
level. A new user's first result must be both right and valid.
"""
from __future__ import annotations

import copy
import random
import time
from collections import deque
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from zhiva.demo import lungs
from zhiva.demo.phantom import Phantom, body_mask, pixel_centres, write_phantom
from zhiva.plugins.tasks import prediction, segmentation
from zhiva.selection import Route, Target

SLICES, SIZE = 100, 192
MODEL_KEY = "3f2b8a3e-8d0a-4c55-9d8e-1f6c2b7a9e10"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Phantom:
    return write_phantom(tmp_path_factory.mktemp("phantom"), slices=SLICES, size=SIZE)


@pytest.fixture(scope="module")
def datasets(phantom: Phantom) -> list[Dataset]:
    return [pydicom.dcmread(path) for path in phantom.files]


@pytest.fixture(scope="module")
def segmented(datasets: list[Dataset]) -> dict:
    return lungs.segment(datasets)


def _mask(result: dict, phantom: Phantom, sop: str) -> np.ndarray:
    segments = result[phantom.study_uid][phantom.series_uid][sop]["segments"]
    assert len(segments) == 1
    return np.array(segments[0]["points"], dtype=bool)


def _metadata(items: list[dict], title: str) -> float:
    return next(item["value"] for item in items if item["title"] == title)


# ---------------------------------------------------------------- phantom


def test_phantom_reads_back_as_one_ct_series(phantom: Phantom, datasets: list[Dataset]) -> None:
    assert [str(ds.SOPInstanceUID) for ds in datasets] == phantom.sop_uids
    assert len(set(phantom.sop_uids)) == SLICES
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert z == sorted(z) and np.allclose(np.diff(z), phantom.slice_spacing_mm)
    for number, ds in enumerate(datasets, start=1):
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == CTImageStorage
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (phantom.study_uid, phantom.series_uid)
        assert ds.InstanceNumber == number
    ds = datasets[0]
    assert str(ds.PatientName) == "Zhiva^Phantom" and ds.Modality == "CT"
    assert (ds.Rows, ds.Columns) == (SIZE, SIZE)
    assert ds.pixel_array.dtype == np.int16
    assert (ds.RescaleSlope, ds.RescaleIntercept) == (1, -1024)
    corner_hu = ds.pixel_array[:5, :5].astype(float) - 1024
    assert abs(corner_hu.mean() + 1000) < 5


def test_phantom_is_deterministic(tmp_path: Path) -> None:
    first = write_phantom(tmp_path / "a", slices=6, size=32, seed=7)
    again = write_phantom(tmp_path / "b", slices=6, size=32, seed=7)
    other = write_phantom(tmp_path / "c", slices=6, size=32, seed=8)
    assert [p.read_bytes() for p in first.files] == [p.read_bytes() for p in again.files]
    assert first.sop_uids == again.sop_uids and first.study_uid == again.study_uid
    assert other.study_uid != first.study_uid
    assert first.files[3].read_bytes() != other.files[3].read_bytes()


def test_phantom_lungs_lie_inside_the_body() -> None:
    """The lung ellipsoids' widest cross-sections are inside the body ellipse."""
    from zhiva.demo.phantom import lungs as phantom_lungs

    x = pixel_centres(512)
    body = body_mask(512)
    for lung in phantom_lungs(SLICES):
        inside = ((x[None, :] - lung.x) / lung.a) ** 2 + ((x[:, None] - lung.y) / lung.b) ** 2 <= 1
        assert inside.any() and not (inside & ~body).any()
        assert lung.c < SLICES / 2 * 2.5


# ---------------------------------------------------------------- measurements


def test_measured_volume_matches_the_analytic_volume(
    phantom: Phantom, datasets: list[Dataset]
) -> None:
    result = lungs.measure(datasets)
    study = result[phantom.study_uid]["metadata"]
    series = result[phantom.study_uid][phantom.series_uid]["metadata"]
    assert study == series
    assert _metadata(study, "Lung volume (ml)") == pytest.approx(phantom.lung_volume_ml, rel=0.03)
    assert _metadata(study, "Right lung (ml)") == pytest.approx(phantom.right_lung_ml, rel=0.03)
    assert _metadata(study, "Left lung (ml)") == pytest.approx(phantom.left_lung_ml, rel=0.03)
    assert _metadata(study, "Slices") == SLICES


def test_mid_lung_slice_has_two_lungs_inside_the_body(
    phantom: Phantom, segmented: dict
) -> None:
    mask = _mask(segmented, phantom, phantom.sop_uids[SLICES // 2])
    assert mask.shape == (SIZE, SIZE)
    assert lungs.label(mask)[1] == 2
    assert not (mask & ~body_mask(SIZE)).any()
    # Analytic cross-section at z ~ 0: pi*a*b for each lung, in pixels.
    expected = np.pi * (60 * 80 + 50 * 75) / phantom.pixel_spacing_mm**2
    assert mask.sum() == pytest.approx(expected, rel=0.03)


def test_instances_without_lung_have_no_segments(phantom: Phantom, segmented: dict) -> None:
    instances = segmented[phantom.study_uid][phantom.series_uid]
    assert list(instances) == phantom.sop_uids
    assert instances[phantom.sop_uids[0]] == {"segments": []}
    assert instances[phantom.sop_uids[-1]] == {"segments": []}


def test_input_order_does_not_matter(phantom: Phantom, datasets: list[Dataset]) -> None:
    shuffled = list(datasets)
    random.Random(3).shuffle(shuffled)
    assert np.array_equal(lungs.lung_mask(shuffled), lungs.lung_mask(datasets))


def test_mixed_series_are_rejected(datasets: list[Dataset]) -> None:
    stranger = copy.deepcopy(datasets[0])
    stranger.SeriesInstanceUID = "1.2.3.4"
    with pytest.raises(ValueError, match="one series"):
        lungs.measure([datasets[1], stranger])


# ---------------------------------------------------------------- proxy checks


@pytest.mark.parametrize("level", ["study", "series"])
def test_results_pass_the_proxy_checks(
    phantom: Phantom, datasets: list[Dataset], segmented: dict, level: str
) -> None:
    series = phantom.series_uid if level == "series" else None
    target = Target(phantom.study_uid, series)
    segmentation.check(segmented, Route("segmentations", MODEL_KEY, target))
    prediction.check(lungs.measure(datasets), Route("predictions", MODEL_KEY, target))


def test_instance_route(phantom: Phantom, datasets: list[Dataset], segmented: dict) -> None:
    """One instance alone: 2-D components find the same lungs as the 3-D ones."""
    sop = phantom.sop_uids[SLICES // 2]
    target = Target(phantom.study_uid, phantom.series_uid, sop)
    alone = lungs.segment([datasets[SLICES // 2]])
    segmentation.check(alone, Route("segmentations", MODEL_KEY, target))
    assert np.array_equal(_mask(alone, phantom, sop), _mask(segmented, phantom, sop))
    measured = lungs.measure([datasets[SLICES // 2]])
    prediction.check(measured, Route("predictions", MODEL_KEY, target))
    items = measured[phantom.study_uid][phantom.series_uid][sop]["metadata"]
    pixels = _mask(segmented, phantom, sop).sum()
    expected_cm2 = pixels * phantom.pixel_spacing_mm**2 / 100
    assert _metadata(items, "Lung area (cm²)") == pytest.approx(expected_cm2, abs=0.1)


def test_instance_without_lung(phantom: Phantom, datasets: list[Dataset]) -> None:
    """A slice above the lungs is a valid answer with nothing in it, not an error."""
    sop = phantom.sop_uids[0]
    target = Target(phantom.study_uid, phantom.series_uid, sop)
    alone = lungs.segment(datasets[:1])
    segmentation.check(alone, Route("segmentations", MODEL_KEY, target))
    assert alone[phantom.study_uid][phantom.series_uid][sop] == {"segments": []}
    measured = lungs.measure(datasets[:1])
    prediction.check(measured, Route("predictions", MODEL_KEY, target))
    assert _metadata(measured[phantom.study_uid]["metadata"], "Lung volume (ml)") == 0


# ---------------------------------------------------------------- components


def _flood_fill(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The obvious breadth-first labelling, as the reference."""
    labels = np.zeros(mask.shape, int)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        count += 1
        labels[start] = count
        queue = deque([start])
        while queue:
            here = queue.popleft()
            for axis in range(mask.ndim):
                for step in (-1, 1):
                    there = list(here)
                    there[axis] += step
                    there = tuple(there)
                    if 0 <= there[axis] < mask.shape[axis] and mask[there] and not labels[there]:
                        labels[there] = count
                        queue.append(there)
    return labels, count


def test_label_matches_a_flood_fill() -> None:
    rng = np.random.default_rng(0)
    for _ in range(100):
        shape = tuple(int(n) for n in rng.integers(1, 9, size=rng.integers(2, 4)))
        mask = rng.random(shape) < rng.uniform(0.2, 0.8)
        labels, count = lungs.label(mask)
        expected, expected_count = _flood_fill(mask)
        assert count == expected_count
        assert not labels[~mask].any()
        # Same partition: each label pairs with exactly one reference label.
        assert len(set(zip(labels[mask].tolist(), expected[mask].tolist()))) == count


def test_label_is_fast_on_a_chest_sized_volume() -> None:
    """A 120x256x256 air mask (outside air, two lungs, noise specks) in well under 2 s."""
    z, y, x = np.ogrid[-60:60, -128:128, -128:128]
    body = (x / 113) ** 2 + (y / 80) ** 2 <= 1
    lung = ((np.abs(x) - 50) / 35) ** 2 + (y / 55) ** 2 + (z / 45) ** 2 <= 1
    specks = np.random.default_rng(0).random((120, 256, 256)) < 0.01
    air = ~body | lung | specks
    start = time.perf_counter()
    labels, count = lungs.label(air)
    elapsed = time.perf_counter() - start
    assert count > 3 and labels[0, 0, 0] != labels[60, 128, 128 + 50]
    assert elapsed < 2.0, f"label took {elapsed:.2f} s"
