"""
A lung model small enough to read: threshold air, drop the air outside the
body, keep the big pockets left (the lungs).

Pure functions on the pydicom Datasets of one series, returning SPEC.md
result objects, so the proxy can run them as an in-process model. Connected
components are written here with numpy (no scipy) as a union-find over runs
of voxels: a 120x256x256 chest takes well under a second.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

#: Lungs are ~-850 HU, soft tissue ~40 HU: anything below this is air-like.
AIR_THRESHOLD_HU = -400.0
COLOR = "#3cb371"
DESCRIPTION = "Lungs: air-like voxels (< {:g} HU) not connected to the air outside the body"


@dataclass(frozen=True)
class Volume:
    """One series as a HU volume (z, y, x) with the datasets in the same slice order."""

    slices: list[Dataset]
    hu: np.ndarray
    #: Voxel size in mm: (slice spacing, row spacing, column spacing).
    spacing: tuple[float, float, float]


@dataclass(frozen=True)
class Region:
    """One kept air pocket: a lung, named right/left when the orientation tells."""

    name: str
    voxels: int


# ---------------------------------------------------------------- results


def segment(
    datasets: Sequence[Dataset],
    *,
    threshold: float = AIR_THRESHOLD_HU,
    color: str = COLOR,
    class_name: str = "lung",
) -> dict:
    """
    A segmentation result: one ``lung`` mask per instance, ``[]`` for
    instances without lung, because viewers draw masks per frame.
    """
    volume = load(datasets)
    mask = _lung_labels(volume.hu, threshold)[0] > 0
    description = DESCRIPTION.format(threshold)
    instances = {}
    for ds, frame in zip(volume.slices, mask):
        segments = []
        if frame.any():
            segments.append(
                {
                    "points": frame.astype(np.uint8).tolist(),
                    "color": color,
                    "className": class_name,
                    "description": description,
                }
            )
        instances[str(ds.SOPInstanceUID)] = {"segments": segments}
    study, series = _uids(volume.slices)
    return {study: {series: instances}}


def measure(datasets: Sequence[Dataset], *, threshold: float = AIR_THRESHOLD_HU) -> dict:
    """
    A prediction result: lung volumes at study and series level and the lung
    area of every instance, so study, series and instance routes all get an
    answer for the UIDs they asked about.
    """
    volume = load(datasets)
    labels, regions = _lung_labels(volume.hu, threshold)
    _, *pixel = volume.spacing
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    total_ml = sum(r.voxels for r in regions) * voxel_ml
    summary = [_number("Lung volume (ml)", total_ml, DESCRIPTION.format(threshold))]
    summary += [_number(f"{r.name} (ml)", r.voxels * voxel_ml) for r in regions]
    summary += [
        _number("Slices", len(volume.slices)),
        _text("Voxel size (mm)", " x ".join(f"{s:.3g}" for s in reversed(volume.spacing))),
    ]
    areas = (labels > 0).sum(axis=(1, 2)) * (pixel[0] * pixel[1] / 100.0)
    instances = {
        str(ds.SOPInstanceUID): {"metadata": [_number("Lung area (cm²)", float(area))]}
        for ds, area in zip(volume.slices, areas)
    }
    study, series = _uids(volume.slices)
    return {study: {"metadata": summary, series: {"metadata": list(summary), **instances}}}


def lung_mask(
    datasets: Sequence[Dataset], *, threshold: float = AIR_THRESHOLD_HU
) -> np.ndarray:
    """The lungs as a bool (z, y, x) volume, slices in ``sort_slices`` order."""
    return _lung_labels(load(datasets).hu, threshold)[0] > 0


def _number(title: str, value: float, description: str | None = None) -> dict:
    shown = value if isinstance(value, int) else round(float(value), 1)
    item = {"dataType": "number", "title": title, "value": shown}
    if description:
        item["description"] = description
    return item


def _text(title: str, value: str) -> dict:
    return {"dataType": "text", "title": title, "value": value}


# ---------------------------------------------------------------- input


def load(datasets: Sequence[Dataset]) -> Volume:
    """
    Sort one series into a HU volume; raise ``ValueError`` for input this
    model cannot measure (mixed series, multi-frame, differing frame sizes).
    """
    slices = sort_slices(datasets)
    _uids(slices)
    frames = [_hounsfield(ds) for ds in slices]
    if len({f.shape for f in frames}) != 1:
        raise ValueError("the instances have different frame sizes")
    row_mm, col_mm = (float(v) for v in slices[0].PixelSpacing)
    return Volume(slices, np.stack(frames), (slice_spacing(slices), row_mm, col_mm))


def sort_slices(datasets: Sequence[Dataset]) -> list[Dataset]:
    """
    Order along the slice normal when every instance has a position and
    orientation (InstanceNumber is not always spatial); else by InstanceNumber.
    """
    if not datasets:
        raise ValueError("no instances to measure")
    positions = _positions(datasets)
    if positions is not None:
        order = np.argsort(positions, kind="stable")
        return [datasets[i] for i in order]
    return sorted(datasets, key=lambda ds: int(ds.get("InstanceNumber") or 0))


def slice_spacing(slices: Sequence[Dataset]) -> float:
    """
    Distance between slice centres from the positions (SliceThickness can
    differ from it when slices overlap or leave gaps); SpacingBetweenSlices
    or SliceThickness only for a single slice or when positions are missing.
    """
    positions = _positions(slices)
    if positions is not None and len(positions) > 1:
        step = float(np.median(np.abs(np.diff(positions))))
        if step > 0:
            return step
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = slices[0].get(keyword)
        if value not in (None, "") and float(value) > 0:
            return float(value)
    raise ValueError("cannot tell the slice spacing: no positions and no SliceThickness")


def _positions(datasets: Sequence[Dataset]) -> np.ndarray | None:
    """Each slice's position along its normal (mm), or None when any lacks geometry."""
    try:
        points = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
        cosines = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    except (AttributeError, TypeError, ValueError):
        return None
    if points.shape[1:] != (3,) or cosines.shape != (6,):
        return None
    return points @ np.cross(cosines[:3], cosines[3:])


def _hounsfield(ds: Dataset) -> np.ndarray:
    """One frame in HU (float32): stored values are rescaled, not HU."""
    pixels = ds.pixel_array
    if pixels.ndim != 2:
        raise ValueError(f"instance {ds.SOPInstanceUID} is not a single-frame grayscale image")
    slope = float(ds.get("RescaleSlope") or 1.0)
    intercept = float(ds.get("RescaleIntercept") or 0.0)
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _uids(slices: Sequence[Dataset]) -> tuple[str, str]:
    """The one (study, series) of the input; a mixed input would be mislabelled."""
    pairs = {(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)) for ds in slices}
    if len(pairs) != 1:
        raise ValueError(f"expected the instances of one series, got {len(pairs)} series")
    return pairs.pop()


# ---------------------------------------------------------------- lungs


def _lung_labels(
    hu: np.ndarray, threshold: float, max_regions: int = 2, min_fraction: float = 0.1
) -> tuple[np.ndarray, list[Region]]:
    """
    Label the lungs 1..k (k <= ``max_regions``) in a HU volume.

    Air touching the in-plane image border is outside the body. The top and
    bottom slices are not a border: lungs often reach past the scanned range.
    Small pockets (bowel gas, noise) are dropped by ``min_fraction`` of the
    largest.
    """
    labels, count = label(hu < threshold)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    sizes[_border_labels(labels)] = 0
    ranked = [int(i) for i in np.argsort(sizes)[::-1][:max_regions] if sizes[i] > 0]
    ranked = [i for i in ranked if sizes[i] >= min_fraction * sizes[ranked[0]]]
    ranked.sort(key=lambda i: _mean_column(labels, i))
    lut = np.zeros(count + 1, np.int32)
    lut[ranked] = np.arange(1, len(ranked) + 1)
    regions = [Region(name, int(sizes[i])) for name, i in zip(_names(len(ranked)), ranked)]
    return lut[labels], regions


def _border_labels(labels: np.ndarray) -> np.ndarray:
    edges = (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1])
    return np.unique(np.concatenate([e.ravel() for e in edges]))


def _mean_column(labels: np.ndarray, index: int) -> float:
    columns = (labels == index).sum(axis=(0, 1))
    return float(columns @ np.arange(columns.size) / max(columns.sum(), 1))


def _names(count: int) -> list[str]:
    """
    Regions are sorted by column. In the usual axial orientation columns run
    to the patient's left, so the first of two is the right lung.
    """
    if count == 2:
        return ["Right lung", "Left lung"]
    return [f"Lung region {i}" for i in range(1, count + 1)]


# ---------------------------------------------------------------- components


def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """
    Face-connected components of a 2-D or 3-D bool mask: (labels, count), 0 is
    background, like ``scipy.ndimage.label`` (scipy is not a dependency).

    Runs of True along x are the nodes: a chest has ~10^5 runs for ~10^7
    voxels, and two runs connect when they overlap in an adjacent row (y) or
    slice (z). The runs are unioned with vectorised hooking and pointer jumping.
    """
    mask = np.asarray(mask, dtype=bool)
    volume = mask[None] if mask.ndim == 2 else mask
    if volume.ndim != 3:
        raise ValueError("label needs a 2-D or 3-D mask")
    depth, height, width = volume.shape
    padded = np.zeros((depth * height, width + 2), np.int8)
    padded[:, 1:-1] = volume.reshape(depth * height, width)
    starts, ends = _runs(padded.ravel())
    rows = starts // (width + 2)
    pairs = [
        _overlaps(starts, ends, width + 2, rows % height != 0),
        _overlaps(starts, ends, (width + 2) * height, rows >= height),
    ]
    a = np.concatenate([p[0] for p in pairs])
    b = np.concatenate([p[1] for p in pairs])
    roots = _union(len(starts), a, b)
    _, run_labels = np.unique(roots, return_inverse=True)
    run_labels = run_labels.astype(np.int32) + 1
    # Paint: +label at each run's start, -label just past its end, then a running sum.
    paint = np.zeros(padded.size, np.int32)
    paint[starts] = run_labels
    paint[ends] = -run_labels
    labels = np.cumsum(paint, dtype=np.int32).reshape(padded.shape)[:, 1:-1]
    return labels.reshape(mask.shape), int(run_labels.max(initial=0))


def _runs(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """
    Runs of 1 in a row-padded flat array: start index and exclusive end. The
    zero padding keeps every run inside its row and makes changes alternate.
    """
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    return changes[0::2], changes[1::2]


def _overlaps(
    starts: np.ndarray, ends: np.ndarray, shift: int, valid: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """
    Pairs (run, earlier run) of overlapping runs ``shift`` indices apart (one
    row or one slice back), for runs whose neighbour row is ``valid``. As runs
    are sorted and disjoint, those a shifted run overlaps form the index range
    found by two binary searches.
    """
    lo = np.searchsorted(ends, starts - shift, side="right")
    hi = np.searchsorted(starts, ends - shift, side="left")
    counts = np.where(valid, np.maximum(hi - lo, 0), 0)
    a = np.repeat(np.arange(len(starts)), counts)
    first = np.repeat(lo - np.cumsum(counts) + counts, counts)
    return a, first + np.arange(counts.sum())


def _union(count: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """
    The root (smallest member) of each node's component: hook every larger
    root onto the smaller root across each edge, then jump pointers until
    every node points at a root; repeat until no edge joins two roots.
    """
    parent = np.arange(count)
    while True:
        ra, rb = parent[a], parent[b]
        split = ra != rb
        if not split.any():
            return parent
        np.minimum.at(parent, np.maximum(ra, rb)[split], np.minimum(ra, rb)[split])
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
