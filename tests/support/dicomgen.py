"""
Synthetic CT studies for tests.

Tests need real Part 10 files (preamble, file meta, Explicit VR Little Endian)
that Orthanc accepts and model APIs decode, of a realistic size, without
shipping patient data. UIDs are deterministic so failures are reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

#: A root reserved for examples and tests (pydicom's own); every UID below is
#: this root plus small positive integers, so always valid and <= 64 chars.
UID_ROOT = "1.2.826.0.1.3680043.8.498."


@dataclass
class StudyInfo:
    """What ``make_study`` wrote, so tests can name UIDs without re-reading files."""

    study_uid: str
    #: SeriesInstanceUID -> SOPInstanceUIDs ordered by InstanceNumber.
    series: dict[str, list[str]]
    big_series_uid: str
    small_series_uid: str
    files: list[Path]
    #: SOPInstanceUID -> the file holding it.
    paths: dict[str, Path] = field(default_factory=dict)

    def all_sops(self) -> list[str]:
        """Every SOPInstanceUID of the study, series by series."""
        return [sop for sops in self.series.values() for sop in sops]

    def series_files(self, series_uid: str) -> list[Path]:
        """The files of one series, ordered by InstanceNumber."""
        return [self.paths[sop] for sop in self.series[series_uid]]


def _base_dataset(study_uid: str) -> Dataset:
    """Attributes shared by every instance of the study."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.StudyInstanceUID = study_uid
    ds.PatientName = "Test^Synthetic"
    ds.PatientID = "ZHIVA-TEST-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC0001"
    ds.ReferringPhysicianName = ""
    ds.Modality = "CT"
    ds.Manufacturer = "zhiva-tests"
    ds.FrameOfReferenceUID = study_uid + ".9"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    return ds


def _write_series(
    outdir: Path,
    base: Dataset,
    series_uid: str,
    series_number: int,
    slices: int,
    rows: int,
    cols: int,
    info: StudyInfo,
) -> None:
    """
    Write one series by mutating a single dataset per slice: building a fresh
    Dataset per file would dominate the runtime for 120 slices.
    """
    ds = base
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"Synthetic CT {rows}x{cols}"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.25
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    # A diagonal ramp: cheap, never all zero, and differs per slice by an offset.
    ramp = (np.add.outer(np.arange(rows), np.arange(cols)) % 2048).astype("<i2")
    sops: list[str] = []
    for number in range(1, slices + 1):
        sop_uid = f"{series_uid}.{number}"
        z = round(-number * 1.25, 2)
        ds.SOPInstanceUID = sop_uid
        meta.MediaStorageSOPInstanceUID = sop_uid
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [-179.2, -179.2, z]
        ds.SliceLocation = z
        ds.PixelData = (ramp + number).tobytes()
        path = outdir / f"s{series_number}_{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sops.append(sop_uid)
        info.files.append(path)
        info.paths[sop_uid] = path
    info.series[series_uid] = sops


def make_study(
    outdir: Path,
    *,
    big_slices: int = 120,
    small_slices: int = 3,
    rows: int = 512,
    cols: int = 512,
) -> StudyInfo:
    """
    Write one CT study into ``outdir``: a big series (``big_slices`` of
    ``rows`` x ``cols``) and a small 64x64 series (``small_slices``), the
    latter for tests that only need a few cheap instances.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    study_uid = UID_ROOT + "20240101.1"
    big_uid = study_uid + ".1"
    small_uid = study_uid + ".2"
    info = StudyInfo(
        study_uid=study_uid,
        series={},
        big_series_uid=big_uid,
        small_series_uid=small_uid,
        files=[],
    )
    _write_series(outdir, _base_dataset(study_uid), big_uid, 1, big_slices, rows, cols, info)
    _write_series(outdir, _base_dataset(study_uid), small_uid, 2, small_slices, 64, 64, info)
    return info
