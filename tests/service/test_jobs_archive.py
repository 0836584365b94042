"""Safe extraction of uploaded dataset archives, and the upload store: an unsafe or malformed
archive is refused with a message and leaves nothing behind; a good one becomes a dataset."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from sss_lib.phantoms import make_phantom_dataset
from sss_lib.service.uploads import ArchiveError, UploadStore, extract_archive

MB = 1 << 20


def write_zip(path: Path, members: dict[str, bytes], *, symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, "/etc/passwd")
    return path


def write_tar(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> Path:
    data = data or {}
    with tarfile.open(path, "w:gz") as tf:
        for info in members:
            payload = data.get(info.name)
            if payload is not None:
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            else:
                tf.addfile(info)
    return path


def tar_info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("name, words", [
    ("../evil.txt", "outside the archive"),
    ("data/../../evil.txt", "outside the archive"),
    ("/etc/evil.txt", "absolute path"),
    ("C:/evil.txt", "absolute path"),
    ("..\\evil.txt", "outside the archive"),
])
def test_zip_with_escaping_names_is_refused(tmp_path, name, words):
    archive = write_zip(tmp_path / "a.zip", {"ok.txt": b"x", name: b"evil"})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArchiveError, match=words):
        extract_archive(archive, out / "data", max_bytes=MB)
    assert leftovers(out) == []
    assert not (tmp_path / "evil.txt").exists()


def test_links_and_devices_are_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cases = {
        "zip_symlink": write_zip(tmp_path / "s.zip", {"a.txt": b"x"}, symlink="link"),
        "tar_symlink": write_tar(tmp_path / "s.tar.gz", [tar_info("link", tarfile.SYMTYPE, "/etc/passwd")]),
        "tar_hardlink": write_tar(tmp_path / "h.tar.gz", [tar_info("a.txt"), tar_info("b", tarfile.LNKTYPE, "a.txt")],
                                  {"a.txt": b"x"}),
        "tar_device": write_tar(tmp_path / "d.tar.gz", [tar_info("dev", tarfile.CHRTYPE)]),
    }
    for what, archive in cases.items():
        with pytest.raises(ArchiveError, match="link" if "link" in what else "not a file or a folder"):
            extract_archive(archive, out / what, max_bytes=MB)
    assert leftovers(out) == []


def test_size_limit_counts_written_bytes(tmp_path):
    # 8 MB of zeros compress to a few kB: a declared size is not trusted, written bytes are counted.
    archive = write_zip(tmp_path / "bomb.zip", {"zeros.bin": bytes(8 * MB)})
    assert archive.stat().st_size < 100_000
    with pytest.raises(ArchiveError) as err:
        extract_archive(archive, tmp_path / "data", max_bytes=2 * MB)
    assert err.value.too_large and "expands to more than 2 MB" in str(err.value)
    assert not (tmp_path / "data").exists()
    assert extract_archive(archive, tmp_path / "data", max_bytes=9 * MB) == tmp_path / "data"
    assert (tmp_path / "data" / "zeros.bin").stat().st_size == 8 * MB


def test_member_count_limit(tmp_path):
    archive = write_zip(tmp_path / "many.zip", {f"f{i}.txt": b"" for i in range(30)})
    with pytest.raises(ArchiveError, match="more than 10 files"):
        extract_archive(archive, tmp_path / "data", max_bytes=MB, max_members=10)


@pytest.mark.parametrize("payload, words", [
    (b"", "empty"),
    (b"hello, this is not an archive", "neither a zip nor a tar.gz"),
    (b"PK\x03\x04" + b"\x00" * 40, "not a readable zip"),
    (b"\x1f\x8b\x08\x00" + b"\x00" * 40, "damaged or truncated|not a readable tar"),
])
def test_malformed_archives(tmp_path, payload, words):
    (tmp_path / "bad").write_bytes(payload)
    with pytest.raises(ArchiveError, match=words):
        extract_archive(tmp_path / "bad", tmp_path / "data", max_bytes=MB)
    assert not (tmp_path / "data").exists()


def test_truncated_tar_gz_is_refused(tmp_path):
    good = write_tar(tmp_path / "g.tar.gz", [tar_info("a.bin")], {"a.bin": bytes(range(256)) * 4000})
    (tmp_path / "cut.tar.gz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ArchiveError, match="damaged or truncated"):
        extract_archive(tmp_path / "cut.tar.gz", tmp_path / "data", max_bytes=10 * MB)
    assert not (tmp_path / "data").exists()


def test_store_accepts_an_nnunet_dataset_in_a_top_folder_and_skips_mac_junk(tmp_path):
    ds = make_phantom_dataset(tmp_path / "Dataset001_Heart", 3, seed=1, labeled=2, n_slices=3, size=(16, 16))
    archive = tmp_path / "ds.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(ds, arcname="Dataset001_Heart")
    store = UploadStore(tmp_path / "uploads", max_extract=10 * MB)
    answer = store.add_archive(archive)
    assert answer["cases"] == 3 and answer["labeled"] == 2 and answer["unlabeled"] == 1
    assert answer["layout"] == "nnunet" and answer["classes"] == {"1": "RV", "2": "Myo", "3": "LV"}
    assert not archive.exists()  # the body is consumed
    record = store.get(answer["upload_id"])
    assert Path(record["path"]).name == "Dataset001_Heart" and (Path(record["path"]) / "dataset.json").is_file()
    assert list(store) == [answer["upload_id"]]

    # A zip made on a Mac, dataset at the root, with __MACOSX and ._ files that are not data.
    members = {str(p.relative_to(ds)): p.read_bytes() for p in ds.rglob("*") if p.is_file()}
    members.update({"__MACOSX/._dataset.json": b"junk", "imagesTr/._case_000_0000.nii.gz": b"junk"})
    answer = store.add_archive(write_zip(tmp_path / "mac.zip", members))
    record = store.get(answer["upload_id"])
    assert answer["cases"] == 3 and Path(record["path"]).name == "data"
    assert not (Path(record["path"]) / "__MACOSX").exists()
    assert not (Path(record["path"]) / "imagesTr" / "._case_000_0000.nii.gz").exists()


def test_store_refuses_an_archive_without_a_dataset(tmp_path):
    store = UploadStore(tmp_path / "uploads", max_extract=MB)
    archive = write_zip(tmp_path / "notes.zip", {"notes/readme.txt": b"no images here"})
    with pytest.raises(ArchiveError, match="no dataset the trainer can read.*nnU-Net"):
        store.add_archive(archive)
    assert list(store) == [] and not archive.exists()
    with pytest.raises(Exception, match="unknown upload"):
        store.get("0123456789abcdef")
    with pytest.raises(Exception, match="unknown upload"):
        store.get("../../etc")


def test_client_packs_plain_tar_for_compressed_images_and_gzip_otherwise(tmp_path):
    from sss_lib.service.client_jobs import pack_dataset

    ds = make_phantom_dataset(tmp_path / "Dataset001_Gz", 2, seed=1, n_slices=3, size=(16, 16))
    plain = pack_dataset(ds, tmp_path / "a.tar")
    assert Path(plain).read_bytes()[:2] != b"\x1f\x8b" and tarfile.is_tarfile(plain)
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "images" / "case_000.nii").write_bytes(bytes(50_000))
    packed = pack_dataset(raw, tmp_path / "b.tar")
    assert Path(packed).read_bytes()[:2] == b"\x1f\x8b" and Path(packed).stat().st_size < 5_000
    store = UploadStore(tmp_path / "uploads", max_extract=10 * MB)
    answer = store.add_archive(Path(plain))
    assert answer["cases"] == 2 and answer["layout"] == "nnunet"
    assert Path(store.get(answer["upload_id"])["path"]).name == "Dataset001_Gz"
