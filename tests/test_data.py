"""core.bundles.data: every bad image becomes an InvalidImageError naming the file; modes, crops, folders."""
from __future__ import annotations

import io
import re
import struct
import tempfile
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from core.bundles.data import MAX_PIXELS, ImageSet, list_images, load_image, load_image_folder, to_model_range
from core.errors import DataError, InvalidImageError


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _noise_png(side: int = 32, seed: int = 0) -> bytes:
    arr = np.random.RandomState(seed).randint(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, "PNG")
    return buf.getvalue()


def _noise_jpeg(side: int = 64, seed: int = 0) -> bytes:
    arr = np.random.RandomState(seed).randint(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose IHDR claims width x height 8-bit grey pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # depth 8, colour type 0 (grey)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _assert_invalid_naming(path: Path, size: int = 16, channels: int = 3) -> InvalidImageError:
    with pytest.raises(InvalidImageError) as info:
        load_image(path, size, channels)
    assert str(path) in str(info.value), f"message does not name the file: {info.value}"
    return info.value


def _save_gray(path: Path, value: int, w: int = 20, h: int = 20) -> None:
    Image.new("L", (w, h), value).save(path)


# ----------------------------------------------------------------------------------------------
# bad bytes
# ----------------------------------------------------------------------------------------------
@settings(derandomize=True, max_examples=60, deadline=None)
@given(st.binary(max_size=64_000))
def test_random_bytes_only_invalid_image_error(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "random.png"
        path.write_bytes(data)
        try:
            out = load_image(path, 16, 3)
        except InvalidImageError as e:
            assert str(path) in str(e)
        else:  # astronomically unlikely, but then it must honour the output contract
            assert out.dtype == np.uint8 and out.shape == (3, 16, 16)


@settings(derandomize=True, max_examples=60, deadline=None)
@given(st.binary(max_size=4_000))
def test_png_signature_plus_random_bytes_only_invalid_image_error(tail):
    """Past the signature sniffing: random chunks after a valid PNG header reach the PNG plugin."""
    head = _noise_png(8)[:33]  # signature + IHDR of an 8x8 RGB PNG
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "mangled.png"
        path.write_bytes(head + tail)
        try:
            out = load_image(path, 8, 1)
        except InvalidImageError as e:
            assert str(path) in str(e)
        else:
            assert out.dtype == np.uint8 and out.shape == (1, 8, 8)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _assert_invalid_naming(path)


def test_png_prefix(tmp_path):
    full = _noise_png(32)
    assert len(full) > 1000
    ok = tmp_path / "full.png"
    ok.write_bytes(full)
    assert load_image(ok, 16, 3).shape == (3, 16, 16)  # control: the whole file is fine
    path = tmp_path / "prefix.png"
    path.write_bytes(full[:100])
    _assert_invalid_naming(path)


def test_jpeg_prefix(tmp_path):
    path = tmp_path / "prefix.jpg"
    path.write_bytes(_noise_jpeg()[:100])
    _assert_invalid_naming(path)


def test_renamed_text_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n" * 20, encoding="utf-8")
    _assert_invalid_naming(path)


def test_truncated_jpeg_fails_on_load_inside_the_guard(tmp_path):
    full = _noise_jpeg(64)
    ok = tmp_path / "full.jpg"
    ok.write_bytes(full)
    assert load_image(ok, 16, 3).shape == (3, 16, 16)  # control
    path = tmp_path / "truncated.jpg"
    path.write_bytes(full[: len(full) // 2])
    with Image.open(path) as img:  # Pillow opens it happily: the failure only comes on load()
        assert img.size == (64, 64)
    err = _assert_invalid_naming(path)
    assert "truncated" in str(err)


def test_nonfinite_float_image_is_invalid(tmp_path):
    arr = np.zeros((8, 8), dtype=np.float32)
    arr[3, 3] = np.nan
    path = tmp_path / "nan.tif"
    Image.fromarray(arr, "F").save(path)
    err = _assert_invalid_naming(path, 8, 1)
    assert "non-finite" in str(err)


def test_bad_channels_is_value_error(tmp_path):
    path = tmp_path / "ok.png"
    _save_gray(path, 10)
    with pytest.raises(ValueError, match="channels"):
        load_image(path, 16, 2)


# ----------------------------------------------------------------------------------------------
# decompression bombs
# ----------------------------------------------------------------------------------------------
def test_png_header_bomb_rejected_fast_and_small(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(20000, 10000))
    assert path.stat().st_size < 200
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        with pytest.raises(InvalidImageError) as info:
            load_image(path, 16, 1)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value)
    assert elapsed < 0.5, f"took {elapsed:.3f} s: the image was decoded"
    assert peak < 50 * 2**20, f"tracemalloc peak {peak / 2**20:.1f} MiB"


def test_png_header_bomb_really_claims_that_size(tmp_path, monkeypatch):
    """Control for the bomb test, and defence in depth: with Pillow's own limit off, MAX_PIXELS still refuses."""
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(20000, 10000))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(path) as img:  # lazy: reads the header only
        assert img.size == (20000, 10000)
    t0 = time.perf_counter()
    err = _assert_invalid_naming(path, 16, 1)
    assert time.perf_counter() - t0 < 0.5
    assert "pixel limit" in str(err)


def test_header_over_max_pixels_but_under_pillow_limit(tmp_path):
    w, h = 9000, 8000
    assert MAX_PIXELS < w * h < Image.MAX_IMAGE_PIXELS
    path = tmp_path / "big.png"
    path.write_bytes(_png_header_only(w, h))
    t0 = time.perf_counter()
    err = _assert_invalid_naming(path, 16, 1)
    assert time.perf_counter() - t0 < 0.5
    assert f"{w}x{h}" in str(err)


# ----------------------------------------------------------------------------------------------
# modes: explicit conversion to the model's channels
# ----------------------------------------------------------------------------------------------
S = 16  # image side; load at size=S (no resize: exact values) and at size=8 (resize: shape)
LEFT, RIGHT = (slice(None), slice(0, S // 2)), (slice(None), slice(S // 2, S))


def _halves(left, right) -> np.ndarray:
    """(S, S[, k]) array whose left half is ``left`` and right half ``right``."""
    left, right = np.asarray(left), np.asarray(right)
    arr = np.empty((S, S) + left.shape, dtype=np.result_type(left, right))
    arr[:, : S // 2] = left
    arr[:, S // 2:] = right
    return arr


def _expect(left_rgb, right_rgb, left_l, right_l):
    """Expected (1, S, S) and (3, S, S) outputs for an image with two uniform halves."""
    e1 = _halves(np.uint8(left_l), np.uint8(right_l))[None]
    e3 = _halves(np.array(left_rgb, np.uint8), np.array(right_rgb, np.uint8)).transpose(2, 0, 1)
    return e1, e3


def _make_mode(mode: str, folder: Path):
    """Write an S x S image in ``mode``; return its path and the exact expected outputs (or a checker)."""
    red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    # Pillow's ITU-R 601-2 luma: red -> 76, green -> 150, blue -> 29
    if mode == "L":
        arr = np.tile(np.arange(0, 256, 256 // S, dtype=np.uint8), (S, 1))
        img, e1 = Image.fromarray(arr, "L"), arr[None]
        e3 = np.stack([arr] * 3)
    elif mode == "RGB":
        img = Image.fromarray(_halves(np.array(red, np.uint8), np.array(blue, np.uint8)), "RGB")
        e1, e3 = _expect(red, blue, 76, 29)
    elif mode == "RGBA":  # left: white but fully transparent -> black; right: opaque green
        img = Image.fromarray(_halves(np.array((255, 255, 255, 0), np.uint8), np.array((0, 255, 0, 255), np.uint8)), "RGBA")
        e1, e3 = _expect((0, 0, 0), green, 0, 150)
    elif mode == "LA":  # left: grey 200 fully transparent -> black; right: opaque grey 200
        img = Image.fromarray(_halves(np.array((200, 0), np.uint8), np.array((200, 255), np.uint8)), "LA")
        e1, e3 = _expect((0, 0, 0), (200, 200, 200), 0, 200)
    elif mode in ("P", "P+transparency"):
        img = Image.fromarray(_halves(np.uint8(0), np.uint8(1)), "P")
        img.putpalette(list(red) + list(green) + [0] * (256 * 3 - 6))
        if mode == "P":
            e1, e3 = _expect(red, green, 76, 150)
        else:  # palette index 0 is transparent -> black
            img.info["transparency"] = 0
            e1, e3 = _expect((0, 0, 0), green, 0, 150)
    elif mode == "1":
        img = Image.fromarray(_halves(np.uint8(0), np.uint8(255)), "L").convert("1")
        e1, e3 = _expect((0, 0, 0), (255, 255, 255), 0, 255)
    elif mode == "CMYK":  # left: full black ink -> black; right: cyan ink -> (0, 255, 255)
        img = Image.fromarray(_halves(np.array((0, 0, 0, 255), np.uint8), np.array((255, 0, 0, 0), np.uint8)), "CMYK")
        cyan_l = round(0.587 * 255 + 0.114 * 255)
        e1, e3 = _expect((0, 0, 0), (0, 255, 255), 0, cyan_l)
    elif mode == "I;16":  # 12-bit-ish data far above 255: naive conversion would clip everything to 255
        raw = np.linspace(1000, 40000, S * S).reshape(S, S).astype(np.uint16)
        img = Image.fromarray(raw)
        assert img.mode == "I;16"
        lo, hi = float(raw.min()), float(raw.max())
        e = np.round((raw.astype(np.float64) - lo) / (hi - lo) * 255).astype(np.uint8)
        e1, e3 = e[None], np.stack([e] * 3)
    else:
        raise AssertionError(mode)
    path = folder / (f"img_{mode.replace(';', '_').replace('+', '_')}" + (".tif" if mode == "CMYK" else ".png"))
    if mode == "P+transparency":
        img.save(path, transparency=0)
    else:
        img.save(path)
    with Image.open(path) as back:  # the file really is in the mode under test
        assert back.mode == mode.split("+")[0]
        if mode == "P+transparency":
            assert "transparency" in back.info
    return path, e1, e3


MODES = ["I;16", "CMYK", "P", "P+transparency", "RGBA", "LA", "1", "L", "RGB"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("channels", [1, 3])
def test_modes_convert_explicitly(tmp_path, mode, channels):
    path, e1, e3 = _make_mode(mode, tmp_path)
    expected = e1 if channels == 1 else e3
    out = load_image(path, S, channels)
    assert out.dtype == np.uint8
    assert out.shape == (channels, S, S)
    diff = np.abs(out.astype(int) - expected.astype(int))
    assert diff.max() <= 1, f"{mode}/{channels}: max abs diff {diff.max()}\n{out[:, 0]}\nvs\n{expected[:, 0]}"
    small = load_image(path, 8, channels)
    assert small.dtype == np.uint8 and small.shape == (channels, 8, 8)
    if channels == 3 and mode in ("I;16", "L", "1", "LA"):  # grey sources give equal RGB planes
        assert np.array_equal(small[0], small[1]) and np.array_equal(small[1], small[2])


def test_i16_extremes_are_0_and_255(tmp_path):
    raw = np.full((S, S), 1000, dtype=np.uint16)
    raw[5:10, 5:10] = 20500  # the middle of the range
    raw[0, 0], raw[-1, -1] = 1000, 40000
    path = tmp_path / "i16.png"
    Image.fromarray(raw).save(path)
    out = load_image(path, S, 1)[0]
    assert out[0, 0] == 0 and out[-1, -1] == 255
    assert abs(int(out[6, 6]) - 127) <= 1


def test_constant_i16_image_is_zero_not_nan(tmp_path):
    path = tmp_path / "flat.png"
    Image.fromarray(np.full((S, S), 30000, dtype=np.uint16)).save(path)
    out = load_image(path, S, 3)
    assert out.dtype == np.uint8 and out.shape == (3, S, S) and not out.any()


# ----------------------------------------------------------------------------------------------
# geometry: centre crop then resize
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wide", [True, False])
def test_non_square_is_centre_cropped_exactly(tmp_path, wide):
    rng = np.random.RandomState(1)
    h, w = (30, 50) if wide else (50, 30)
    arr = rng.randint(0, 256, (h, w), dtype=np.uint8)
    path = tmp_path / "rect.png"
    Image.fromarray(arr, "L").save(path)
    out = load_image(path, 30, 1)[0]
    expected = arr[:, 10:40] if wide else arr[10:40, :]
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("wide", [True, False])
def test_non_square_crop_then_resize_drops_the_margins(tmp_path, wide):
    # 40 x 20 (or 20 x 40): white margins of 10 px, black centre square; after the crop only black remains
    arr = np.full((20, 40), 255, dtype=np.uint8)
    arr[:, 10:30] = 0
    if not wide:
        arr = arr.T.copy()
    path = tmp_path / "margins.png"
    Image.fromarray(arr, "L").save(path)
    out = load_image(path, 8, 3)
    assert out.shape == (3, 8, 8)
    assert out.max() == 0, "margins leaked into the output: not a centre crop"


def test_mixed_sizes_all_come_out_at_size(tmp_path):
    sizes = [(8, 8), (64, 64), (300, 17), (17, 300), (1, 1), (33, 65)]
    for i, (w, h) in enumerate(sizes):
        _save_gray(tmp_path / f"{i}.png", 100, w, h)
    ds = load_image_folder(tmp_path, 24, 1)
    assert ds.images.shape == (len(sizes), 1, 24, 24)
    assert ds.images.dtype == torch.uint8
    assert (ds.images == 100).all()  # a constant image stays constant through crop and Lanczos
    assert ds.skipped == []


# ----------------------------------------------------------------------------------------------
# folders
# ----------------------------------------------------------------------------------------------
def _folder_of_20(root: Path) -> str:
    rng = np.random.RandomState(3)
    for i in range(20):
        w, h = int(rng.randint(12, 40)), int(rng.randint(12, 40))
        arr = rng.randint(0, 256, (h, w, 3), dtype=np.uint8)
        ext = (".png", ".jpg", ".bmp", ".webp")[i % 4]
        Image.fromarray(arr, "RGB").save(root / f"img_{i:02d}{ext}")
    bad = "img_05.jpg"
    data = (root / bad).read_bytes()
    (root / bad).write_bytes(data[: len(data) // 3])
    return bad


def test_folder_with_one_corrupt_file(tmp_path):
    bad = _folder_of_20(tmp_path)
    calls = []
    ds = load_image_folder(tmp_path, 16, 3, progress=lambda i, n: calls.append((i, n)))
    assert isinstance(ds, ImageSet)
    assert len(ds) == 19 and ds.images.shape == (19, 3, 16, 16) and ds.images.dtype == torch.uint8
    assert [p for p, _ in ds.skipped] == [bad]
    reason = ds.skipped[0][1]
    assert isinstance(reason, str) and reason.strip() and str(tmp_path) not in reason
    assert bad not in ds.paths
    assert ds.paths == sorted(ds.paths)
    assert ds.paths == sorted(f"img_{i:02d}{('.png', '.jpg', '.bmp', '.webp')[i % 4]}" for i in range(20) if i != 5)
    assert ds.class_ids is None and ds.class_names == []
    assert calls[-1] == (20, 20) and all(a[0] <= b[0] and a[1] == 20 for a, b in zip(calls, calls[1:]))
    # each row is the image at paths[i]
    for k in (0, 9, 18):
        assert np.array_equal(ds.images[k].numpy(), load_image(tmp_path / ds.paths[k], 16, 3))
    again = load_image_folder(tmp_path, 16, 3)
    assert torch.equal(ds.images, again.images)
    assert again.paths == ds.paths and again.skipped == ds.skipped


def test_folder_without_images_is_data_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.csv").write_text("a,b\n")
    (tmp_path / ".hidden.png").write_bytes(_noise_png(8))  # hidden files are not images of the set
    with pytest.raises(DataError, match="no images"):
        list_images(tmp_path)
    with pytest.raises(DataError, match=re.escape(str(tmp_path))):
        load_image_folder(tmp_path, 16, 1)


def test_missing_folder_is_data_error(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        load_image_folder(tmp_path / "nope", 16, 1)


def test_folder_all_corrupt_is_data_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "c.png").write_bytes(_noise_png(16)[:60])
    with pytest.raises(DataError) as info:
        load_image_folder(tmp_path, 16, 1)
    msg = str(info.value)
    assert "none of the 3 images" in msg and "a.png" in msg


def test_size_out_of_range(tmp_path):
    _save_gray(tmp_path / "a.png", 1)
    for bad in (4, 2048):
        with pytest.raises(ValueError, match="size"):
            load_image_folder(tmp_path, bad, 1)


def test_subfolder_layout_gives_sorted_classes(tmp_path):
    layout = {"zebra": 3, "apple": 2, "Mango": 2}
    for name, n in layout.items():
        (tmp_path / name).mkdir()
        for i in range(n):
            _save_gray(tmp_path / name / f"{i}.png", 10 * i + len(name))
    (tmp_path / "apple" / "broken.png").write_bytes(b"junk")  # a skip must not shift the class ids
    (tmp_path / "zebra" / "deep").mkdir()
    _save_gray(tmp_path / "zebra" / "deep" / "x.png", 5)  # deeper files belong to their top folder
    ds = load_image_folder(tmp_path, 8, 1)
    assert ds.class_names == sorted(layout) == ["Mango", "apple", "zebra"]
    assert [p for p, _ in ds.skipped] == ["apple/broken.png"]
    assert ds.class_ids is not None and ds.class_ids.dtype == torch.int64
    assert len(ds.class_ids) == len(ds.paths) == 2 + 2 + 4
    for p, c in zip(ds.paths, ds.class_ids.tolist()):
        assert ds.class_names[c] == p.split("/")[0]
    assert ds.class_ids.tolist() == [0, 0, 1, 1, 2, 2, 2, 2]
    paths, classes, names = list_images(tmp_path)
    assert names == ["Mango", "apple", "zebra"] and "apple/broken.png" in paths
    assert classes == [names.index(p.split("/")[0]) for p in paths]


def test_single_subfolder_or_top_level_files_give_no_classes(tmp_path):
    (tmp_path / "only").mkdir()
    _save_gray(tmp_path / "only" / "a.png", 1)
    _save_gray(tmp_path / "only" / "b.png", 2)
    assert list_images(tmp_path)[1:] == (None, [])
    (tmp_path / "other").mkdir()
    _save_gray(tmp_path / "other" / "c.png", 3)
    _save_gray(tmp_path / "top.png", 4)  # one file at the top: not a class layout
    paths, classes, names = list_images(tmp_path)
    assert paths == ["only/a.png", "only/b.png", "other/c.png", "top.png"]
    assert classes is None and names == []


def test_to_model_range():
    x = torch.tensor([0, 255, 128], dtype=torch.uint8).reshape(1, 1, 1, 3)
    y = to_model_range(x)
    assert y.dtype == torch.float32
    assert y.flatten().tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1.0], abs=1e-6)


# ---- an uploaded NIfTI: the voxel budget and the memory it takes ---------------------------------------------
def _gzip_nifti(shape, live: bool) -> bytes:
    """A gzip NIfTI-1 uint8 volume of ``shape`` written slice by slice (never whole in memory): zeros, or with
    ``live`` a bright strip in every slice (so each band slice is non-empty). Compresses ~1000x."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.uint8)
    hdr["vox_offset"] = 352
    c = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    per = shape[0] * shape[1]
    sl = (b"\x01" * min(1000, per) + b"\0" * max(per - 1000, 0)) if live else b"\0" * per
    return b"".join([c.compress(hdr.binaryblock + b"\0" * 4)] + [c.compress(sl) for _ in range(shape[2])] + [c.flush()])


def test_upload_nifti_over_the_voxel_budget_is_refused_from_its_header(tmp_path, monkeypatch):
    """A 260 KB gzip declaring 1024x1024x255 uint8 (255 MiB) raised the server's RSS by 1 GB under the old 256 MiB
    budget. Now one line from the header, before any voxel is decompressed."""
    import nibabel as nib

    from core.bundles.data import UPLOAD_MAX_VOXEL_BYTES, read_upload

    assert UPLOAD_MAX_VOXEL_BYTES == 64 * 2**20
    f = tmp_path / "bomb.nii.gz"
    f.write_bytes(_gzip_nifti((1024, 1024, 255), live=False))
    assert f.stat().st_size < 300_000
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__getitem__",
                        lambda *a: pytest.fail("voxels were read"))  # refused before decompression
    tracemalloc.start()
    try:
        with pytest.raises(InvalidImageError) as info:
            read_upload(f, 32, 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(info.value)
    assert msg == "bomb.nii.gz: header promises 255 MiB of voxels (limit 64 MiB)" and peak < 4 * 2**20, (msg, peak)


def test_upload_nifti_memory_is_one_slice_not_the_volume(tmp_path):
    """An allowed upload (512x512x64 uint8, 16 MiB declared, 16 KB of gzip) is decoded one band slice at a time:
    the traced peak stays well under the volume's own size (reading it whole as float32 took 80 MiB), and the
    slices are those of the band."""
    from core.bundles.data import read_upload

    f = tmp_path / "live.nii.gz"
    f.write_bytes(_gzip_nifti((512, 512, 64), live=True))
    tracemalloc.start()
    try:
        up = read_upload(f, 32, 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert up.kind == "NIfTI" and [z for z, _ in up.slices] == list(range(25, 39))  # band (0.4, 0.6) of 64
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB traced for a 16 MiB volume"


def test_nifti_gzip_cut_after_the_band_is_still_refused(tmp_path):
    """Only the band's slices are decoded, but the rest of the gzip stream is still read (and dropped): a file cut
    after the band is refused as truncated, as when the whole volume was read."""
    import gzip

    import nibabel as nib

    from core.bundles.data import load_nifti_slices

    vol = np.random.default_rng(0).random((24, 24, 20)).astype(np.float32)
    gz = gzip.compress(nib.Nifti1Image(vol, np.eye(4)).to_bytes())
    assert len(load_nifti_slices("whole.nii.gz", 16, data=gz)) == 4  # z 8..11 of 20
    with pytest.raises(InvalidImageError, match="cut.nii.gz: cannot read voxels"):
        load_nifti_slices("cut.nii.gz", 16, data=gz[: len(gz) * 9 // 10])  # the band (40-60 %) is intact


def test_nifti2_dims_whose_int64_product_wraps_to_zero_are_refused_by_size():
    """Probe up_nifti2_dims_overflow: 2^32 x 2^32 x 2^32 voxels made the int64 size product 0, which passed the size
    check (nibabel's OverflowError stopped it later). The size is now an exact integer."""
    import nibabel as nib

    from core.bundles.data import read_upload

    hdr = nib.Nifti2Header()
    hdr.set_data_dtype(np.uint8)
    hdr["dim"][:4] = [3, 2**32, 2**32, 2**32]
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "wrap.nii"
        f.write_bytes(hdr.binaryblock + bytes(104))
        with pytest.raises(InvalidImageError, match=r"^wrap.nii: header promises [\d,]+ MiB of voxels \(limit 64 MiB\)$"):
            read_upload(f, 32, 1)
