from __future__ import annotations

import cv2
import numpy as np
import pytest

from smearpipe import SmearpipeError
from smearpipe.errors import ImageReadError, InvalidImageError
from smearpipe.io import load_image, read_image, to_rgb_uint8, write_image

from .conftest import SAMPLES


def test_read_sample_is_rgb_uint8():
    img = read_image(SAMPLES / "BloodImage_00007.jpg")
    assert img.shape == (480, 640, 3) and img.dtype == np.uint8
    bgr = cv2.imread(str(SAMPLES / "BloodImage_00007.jpg"))
    np.testing.assert_array_equal(img, bgr[:, :, ::-1])  # BGR undone exactly once


def test_load_image_accepts_path_and_array():
    path = SAMPLES / "BloodImage_00007.jpg"
    a = load_image(path)
    b = load_image(str(path))
    c = load_image(a)
    np.testing.assert_array_equal(a, b)
    assert c is a  # already conventional: no copy


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.full((2, 3), 7, np.uint8), np.full((2, 3, 3), 7, np.uint8)),
        (np.full((2, 3, 1), 9, np.uint8), np.full((2, 3, 3), 9, np.uint8)),
        (np.full((2, 3, 3), 65535, np.uint16), np.full((2, 3, 3), 255, np.uint8)),
        (np.full((2, 3, 3), 257 * 10, np.uint16), np.full((2, 3, 3), 160, np.uint8)),  # 2570: 12-bit range
        (np.full((2, 3, 3), 0.5, np.float32), np.full((2, 3, 3), 128, np.uint8)),
        (np.full((2, 3, 3), 1.0, np.float64), np.full((2, 3, 3), 255, np.uint8)),
    ],
)
def test_conversion_rules(array, expected):
    np.testing.assert_array_equal(to_rgb_uint8(array), expected)


@pytest.mark.parametrize("bits", [8, 10, 12, 14, 16])
def test_uint16_from_a_camera_of_fewer_bits_keeps_its_brightness(bits):
    """A 16-bit file written by an 8-14-bit camera: its full scale maps to 255, not to a near-black image."""
    top = 2**bits - 1
    image = np.zeros((2, 4, 3), np.uint16)
    image[0] = top  # bright background
    image[1] = (top + 1) // 2  # a cell at half scale
    out = to_rgb_uint8(image)
    np.testing.assert_array_equal(out[0], np.full((4, 3), 255, np.uint8))
    np.testing.assert_array_equal(out[1], np.full((4, 3), 128, np.uint8))


def test_uint16_explicit_bit_depth():
    image = np.full((2, 2, 3), 200, np.uint16)
    assert to_rgb_uint8(image)[0, 0, 0] == 200  # 8-bit range inferred
    assert to_rgb_uint8(image, bit_depth=16)[0, 0, 0] == 1  # 200 / 257
    assert to_rgb_uint8(image, bit_depth=12)[0, 0, 0] == 12  # 200 * 255 / 4095
    with pytest.raises(InvalidImageError, match="above the 8-bit range"):
        to_rgb_uint8(np.full((2, 2, 3), 300, np.uint16), bit_depth=8)
    for bad in (7, 17, 12.0, True, "12"):
        with pytest.raises(ValueError, match="bit_depth"):
            to_rgb_uint8(image, bit_depth=bad)


def test_rgba_composited_over_white():
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque: kept
    rgba[0, 1] = (10, 20, 30, 0)  # transparent: white
    out = to_rgb_uint8(rgba)
    np.testing.assert_array_equal(out[0, 0], (10, 20, 30))
    np.testing.assert_array_equal(out[0, 1], (255, 255, 255))


@pytest.mark.parametrize(
    "array, fragment",
    [
        (np.zeros((3, 4, 5), np.uint8), "got shape (3, 4, 5)"),
        (np.zeros((3, 40, 50), np.uint8), "channel-first"),
        (np.zeros((4,), np.uint8), "got shape (4,)"),
        (np.zeros((0, 4, 3), np.uint8), "at least one pixel"),
        (np.full((2, 2, 3), np.nan, np.float32), "NaN"),
        (np.full((2, 2, 3), np.inf, np.float64), "NaN or infinite"),
        (np.full((2, 2, 3), 200.0, np.float32), "range [200, 200]"),
        (np.zeros((2, 2, 3), bool), "dtype bool"),
        (np.zeros((2, 2, 3), np.int64), "dtype int64"),
    ],
)
def test_bad_arrays_raise_our_error(array, fragment):
    with pytest.raises(InvalidImageError) as info:
        to_rgb_uint8(array)
    assert fragment in str(info.value)
    assert isinstance(info.value, SmearpipeError)


def test_non_array_rejected():
    with pytest.raises(InvalidImageError, match="numpy array or a path"):
        load_image([[1, 2, 3]])  # type: ignore[arg-type]


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageReadError, match="nope.jpg"):
        read_image(missing)


def test_a_path_that_is_not_a_path():
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got bytes"):
        read_image(b"x.png")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="an array: load_image"):
        read_image(np.zeros((4, 4, 3), np.uint8))  # type: ignore[arg-type]


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageReadError, match="not a file"):
        read_image(tmp_path)


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\xff\xd8\xff\xe0" + b"\x00" * 20])
def test_corrupt_file_names_path(tmp_path, content):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(content)
    with pytest.raises(ImageReadError, match="corrupt.jpg"):
        read_image(bad)


def test_read_16bit_and_rgba_png(tmp_path):
    img16 = np.zeros((5, 6, 3), np.uint16)
    img16[..., 2] = 65535  # red in BGR order on disk
    cv2.imwrite(str(tmp_path / "a.png"), img16)
    out = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(out[0, 0], (255, 0, 0))
    img16[..., 2] = 4095  # a 12-bit camera's white, saved as 16-bit
    cv2.imwrite(str(tmp_path / "a12.png"), img16)
    np.testing.assert_array_equal(read_image(tmp_path / "a12.png")[0, 0], (255, 0, 0))
    np.testing.assert_array_equal(read_image(tmp_path / "a12.png", bit_depth=16)[0, 0], (16, 0, 0))
    bgra = np.zeros((5, 6, 4), np.uint8)
    bgra[..., 0] = 200  # blue
    bgra[..., 3] = 255
    cv2.imwrite(str(tmp_path / "b.png"), bgra)
    np.testing.assert_array_equal(read_image(tmp_path / "b.png")[0, 0], (0, 0, 200))
    gray = np.full((5, 6), 77, np.uint8)
    cv2.imwrite(str(tmp_path / "c.png"), gray)
    np.testing.assert_array_equal(read_image(tmp_path / "c.png")[0, 0], (77, 77, 77))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_read_image_applies_exif_orientation_as_viewers_do(tmp_path, orientation):
    """A phone on the eyepiece records its orientation in EXIF: the array is the image shown upright,
    as OpenCV's own oriented decode gives it (the oracle), not the stored pixels."""
    from PIL import Image

    stored = np.zeros((24, 40, 3), np.uint8)
    stored[:8, :10] = (255, 0, 0)  # corners that tell every flip and turn apart
    stored[16:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=100)
    upright = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    out = read_image(path)
    assert out.shape == ((40, 24, 3) if orientation >= 5 else (24, 40, 3))
    np.testing.assert_array_equal(out, upright)
    assert out.flags.c_contiguous


def test_write_image_never_overwrites(tmp_path):
    img = np.zeros((4, 4, 3), np.uint8)
    img[..., 0] = 255
    path = write_image(tmp_path / "out.png", img)
    np.testing.assert_array_equal(read_image(path), img)
    with pytest.raises(FileExistsError):
        write_image(path, np.zeros((4, 4, 3), np.uint8))
    np.testing.assert_array_equal(read_image(path), img)  # untouched
    write_image(path, np.zeros((4, 4, 3), np.uint8), overwrite=True)
    assert read_image(path).max() == 0


def test_write_image_bad_extension(tmp_path):
    with pytest.raises(ValueError, match="extension"):
        write_image(tmp_path / "x.xyz", np.zeros((2, 2, 3), np.uint8))
    assert not (tmp_path / "x.xyz").exists()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_read_float_tiff(tmp_path, dtype):
    bgr = cv2.imread(str(SAMPLES / "BloodImage_00007.jpg"))
    path = tmp_path / "f.tif"
    assert cv2.imwrite(str(path), bgr.astype(dtype) / 255)
    np.testing.assert_array_equal(read_image(path), bgr[:, :, ::-1])  # same rules as float arrays


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_signed_integer_tiff_refused(tmp_path, dtype, channels):
    path = tmp_path / "s.tif"
    assert cv2.imwrite(str(path), np.full((5, 6, channels), 7, dtype))
    with pytest.raises(ImageReadError, match=f"s.tif .*dtype {np.dtype(dtype).name}"):
        read_image(path)


def test_16bit_rgba_depth_comes_from_colour_not_alpha(tmp_path):
    rgba = np.zeros((6, 7, 4), np.uint16)
    rgba[..., :3], rgba[..., 3] = 4095, 65535  # a 12-bit camera's white, opaque (16-bit alpha spans 0-65535)
    np.testing.assert_array_equal(to_rgb_uint8(rgba), np.full((6, 7, 3), 255, np.uint8))
    np.testing.assert_array_equal(to_rgb_uint8(rgba, bit_depth=12), np.full((6, 7, 3), 255, np.uint8))
    rgba[..., :3], rgba[..., 3] = 2048, 0  # fully transparent: the white page behind it
    np.testing.assert_array_equal(to_rgb_uint8(rgba), np.full((6, 7, 3), 255, np.uint8))
    rgba[..., 3] = 65535
    assert to_rgb_uint8(rgba)[0, 0, 0] == 128  # 2048 of 4095
    path = tmp_path / "rgba16.png"
    rgba[..., :3] = (4095, 2048, 0)
    cv2.imwrite(str(path), rgba[..., [2, 1, 0, 3]])  # OpenCV writes BGRA
    np.testing.assert_array_equal(read_image(path)[0, 0], [255, 128, 0])


def test_image_too_large_for_opencv_is_our_error(tmp_path):
    import struct
    import zlib

    png = bytearray(cv2.imencode(".png", np.zeros((2, 2, 3), np.uint8))[1].tobytes())
    ihdr = png.index(b"IHDR")  # claim 40000 x 40000 px (1.6e9, above OpenCV's 2**30): a stitched slide
    png[ihdr + 4: ihdr + 12] = struct.pack(">II", 40000, 40000)
    png[ihdr + 17: ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(png[ihdr: ihdr + 17])))
    path = tmp_path / "huge.png"
    path.write_bytes(bytes(png))
    with pytest.raises(ImageReadError, match="huge.png.*split"):
        read_image(path)


@pytest.mark.parametrize("bad, message", [
    ("field.png", "must be a numpy array, got str (read a file with read_image)"),
    (np.zeros((4, 5), np.int64), "got shape (4, 5) and dtype int64"),  # as given, not with its added channel axis
])
def test_to_rgb_uint8_messages(bad, message):
    with pytest.raises(InvalidImageError) as info:
        to_rgb_uint8(bad)
    assert message in str(info.value)


def test_channel_first_hint_only_where_it_fits():
    with pytest.raises(InvalidImageError) as info:
        to_rgb_uint8(np.zeros((4, 5, 2), np.uint8))  # 2 channels, not channel-first
    assert "channel-first" not in str(info.value)
    with pytest.raises(InvalidImageError, match="channel-first"):
        to_rgb_uint8(np.zeros((3, 40, 50), np.uint8))


def test_the_public_names_are_importable_from_the_package():
    import smearpipe

    for name in smearpipe.__all__:
        assert getattr(smearpipe, name) is not None, name
    assert issubclass(smearpipe.ScaleEstimationError, smearpipe.SmearpipeError)
