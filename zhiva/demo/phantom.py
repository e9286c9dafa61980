"""
A synthetic chest CT study for trying the proxy without patient data.

The lungs are ellipsoids of known semi-axes, so the true lung volume is known
exactly (4/3·π·a·b·c) and a lung model's answer can be checked against it.
Geometry is fixed in millimetres (a 384 mm field of view): ``size`` only
changes the pixel spacing, so every phantom holds the same anatomy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    PYDICOM_IMPLEMENTATION_UID,
    generate_uid,
)

FIELD_OF_VIEW_MM = 384.0
SLICE_SPACING_MM = 2.5
AIR_HU, TISSUE_HU, LUNG_HU, BONE_HU = -1000, 40, -850, 700
#: Body cross-section: an ellipse centred in the field, (x, y) semi-axes in mm.
BODY_MM = (170.0, 120.0)
#: Spine: a disc posterior (+y in DICOM patient coordinates) between the lungs.
SPINE_MM = (0.0, 75.0, 18.0)
#: Largest lung z semi-axis; shorter studies get proportionally shorter lungs.
MAX_LUNG_HALF_HEIGHT_MM = 100.0


@dataclass(frozen=True)
class Lung:
    """An ellipsoid centred at (x, y, z=0) mm with semi-axes a (x), b (y), c (z)."""

    name: str
    x: float
    y: float
    a: float
    b: float
    c: float

    @property
    def volume_ml(self) -> float:
        return 4.0 / 3.0 * math.pi * self.a * self.b * self.c / 1000.0


@dataclass(frozen=True)
class Phantom:
    """What ``write_phantom`` wrote, with the ground truth a model is judged by."""

    study_uid: str
    series_uid: str
    #: SOPInstanceUIDs in slice order (InstanceNumber 1, 2, ...; z increasing).
    sop_uids: list[str]
    files: list[Path]
    #: Exact analytic volume of both lungs.
    lung_volume_ml: float
    right_lung_ml: float
    left_lung_ml: float
    pixel_spacing_mm: float
    slice_spacing_mm: float


def lungs(slices: int) -> tuple[Lung, Lung]:
    """
    The right (patient right, -x) and left lung; their height fits the
    study's z-range with a margin so no lung touches the first or last slice.
    """
    c = min(MAX_LUNG_HALF_HEIGHT_MM, 0.4 * slices * SLICE_SPACING_MM)
    # The right lung is the larger one, as in people.
    return (
        Lung("right", -80.0, 0.0, 60.0, 80.0, c),
        Lung("left", 75.0, 0.0, 50.0, 75.0, 0.95 * c),
    )


def pixel_centres(size: int) -> np.ndarray:
    """Patient x (= y) coordinate in mm of each column's centre, symmetric about 0."""
    spacing = FIELD_OF_VIEW_MM / size
    return (np.arange(size) - (size - 1) / 2.0) * spacing


def body_mask(size: int) -> np.ndarray:
    """The body cross-section (same on every slice): lets tests tell inside from outside."""
    x = pixel_centres(size)
    return (x[None, :] / BODY_MM[0]) ** 2 + (x[:, None] / BODY_MM[1]) ** 2 <= 1.0


def write_phantom(
    outdir: Path, *, slices: int = 120, size: int = 256, seed: int = 0
) -> Phantom:
    """
    Write one CT series of ``slices`` axial ``size`` x ``size`` images into
    ``outdir``. Pixels and UIDs depend only on the arguments, so reruns give
    the same study; different sizes give different UIDs and never collide.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    right, left = lungs(slices)
    z_mm = (np.arange(slices) - (slices - 1) / 2.0) * SLICE_SPACING_MM
    entropy = f"zhiva-phantom:{seed}:{slices}:{size}"
    study_uid = generate_uid(entropy_srcs=[entropy, "study"])
    series_uid = generate_uid(entropy_srcs=[entropy, "series"])
    ds = _base_dataset(study_uid, series_uid, size, generate_uid(entropy_srcs=[entropy, "for"]))
    rng = np.random.default_rng(seed)
    base = _base_slice(size)
    origin = float(pixel_centres(size)[0])
    sop_uids, files = [], []
    for number, z in enumerate(z_mm, start=1):
        sop_uid = generate_uid(entropy_srcs=[entropy, "sop", str(number)])
        hu = _slice_hu(base, size, float(z), (right, left), rng)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [origin, origin, round(float(z), 3)]
        ds.SliceLocation = round(float(z), 3)
        ds.PixelData = (hu + 1024).astype("<i2").tobytes()
        path = outdir / f"phantom_{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sop_uids.append(sop_uid)
        files.append(path)
    return Phantom(
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uids=sop_uids,
        files=files,
        lung_volume_ml=right.volume_ml + left.volume_ml,
        right_lung_ml=right.volume_ml,
        left_lung_ml=left.volume_ml,
        pixel_spacing_mm=FIELD_OF_VIEW_MM / size,
        slice_spacing_mm=SLICE_SPACING_MM,
    )


def _base_slice(size: int) -> np.ndarray:
    """Air, body and spine: the part of every slice that does not change with z."""
    x = pixel_centres(size)
    hu = np.full((size, size), AIR_HU, np.float32)
    hu[body_mask(size)] = TISSUE_HU
    sx, sy, radius = SPINE_MM
    hu[(x[None, :] - sx) ** 2 + (x[:, None] - sy) ** 2 <= radius**2] = BONE_HU
    return hu


def _slice_hu(
    base: np.ndarray, size: int, z: float, lungs_: tuple[Lung, ...], rng: np.random.Generator
) -> np.ndarray:
    """One slice in HU: the lungs' cross-sections at ``z`` painted over ``base``, plus noise."""
    x = pixel_centres(size)
    hu = base.copy()
    for lung in lungs_:
        left_over = 1.0 - (z / lung.c) ** 2
        if left_over <= 0:
            continue
        inside = ((x[None, :] - lung.x) / lung.a) ** 2 + ((x[:, None] - lung.y) / lung.b) ** 2
        hu[inside <= left_over] = LUNG_HU
    # Tissue-like noise inside the body, a little outside; air never drops below -1024.
    sigma = np.where(base > AIR_HU, 15.0, 3.0).astype(np.float32)
    hu += rng.standard_normal((size, size), dtype=np.float32) * sigma
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def _base_dataset(study_uid: str, series_uid: str, size: int, frame_uid: str) -> Dataset:
    """
    Attributes shared by every slice: one dataset is mutated per slice because
    building a fresh Dataset per file would dominate the runtime.
    """
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.PatientName = "Zhiva^Phantom"
    ds.PatientID = "ZHIVA-PHANTOM"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Zhiva synthetic chest CT"
    ds.SeriesDescription = "Phantom lungs"
    ds.SeriesNumber = 1
    ds.Modality = "CT"
    ds.Manufacturer = "zhiva"
    ds.BodyPartExamined = "CHEST"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PatientPosition = "HFS"
    spacing = FIELD_OF_VIEW_MM / size
    ds.PixelSpacing = [round(spacing, 6), round(spacing, 6)]
    ds.SliceThickness = SLICE_SPACING_MM
    ds.SpacingBetweenSlices = SLICE_SPACING_MM
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = -600
    ds.WindowWidth = 1500
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    return ds
