"""Reading what SimpleITK reads: NIfTI, NRRD, MHA and a DICOM series folder; case grouping."""

import numpy as np
import pytest
import SimpleITK as sitk

from DiffSegCore.io.cases import case_name, collect_cases
from DiffSegCore.io.volumes import read_volume


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii"])
def test_formats_read_back_identically(tmp_path, hippocampus_case, suffix):
    image = sitk.ReadImage(str(hippocampus_case[0]))
    path = tmp_path / f"case{suffix}"
    sitk.WriteImage(image, str(path))
    again = read_volume(path)
    assert np.array_equal(sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(image))
    assert again.GetSpacing() == image.GetSpacing()


def test_dicom_series_folder_is_one_volume(tmp_path, hippocampus_case):
    image = sitk.Cast(sitk.ReadImage(str(hippocampus_case[0])), sitk.sitkInt16)
    folder = tmp_path / "series"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(image.GetDepth()):
        slice_ = image[:, :, z]
        for tag, value in {
            "0020|000e": "1.2.826.0.1.3680043.2.1125.1",
            "0020|0032": "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, z)))),
            "0020|0013": str(z),
            "0008|0060": "MR",
        }.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{z:03d}.dcm"))
        writer.Execute(slice_)
    volume = read_volume(folder)
    assert volume.GetSize() == image.GetSize()
    assert np.array_equal(sitk.GetArrayFromImage(volume), sitk.GetArrayFromImage(image))
    assert collect_cases([str(folder)]) == {"series": [folder]}


def test_case_names_and_channel_grouping(tmp_path):
    assert case_name("/x/BRATS_001_0000.nii.gz") == "BRATS_001"
    assert case_name("scan.nrrd") == "scan"
    for name in ("a_0001.nii.gz", "a_0000.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    cases = collect_cases([str(tmp_path)])
    assert {k: [p.name for p in v] for k, v in cases.items()} == {
        "a": ["a_0000.nii.gz", "a_0001.nii.gz"],
        "b": ["b_0000.nii.gz", "b_0001.nii.gz"],
    }
