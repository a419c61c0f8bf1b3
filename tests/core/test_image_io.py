import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from fkd_core.errors import ImageError
from fkd_core.image_io import decode_gray, list_images, read_gray


def _png(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def test_decodes_gray_rgb_rgba_and_16_bit_to_the_same_gray():
    base = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (8, 1))
    bgr = cv2.merge([base, base, base])
    rgba = cv2.merge([base, base, base, np.full_like(base, 255)])
    sixteen = base.astype(np.uint16) * 257
    for arr in (base, bgr, rgba, sixteen):
        out = decode_gray(_png(arr))
        assert out.gray.dtype == np.uint8 and out.gray.shape == base.shape
        assert np.abs(out.gray.astype(int) - base).max() <= 1


def test_exif_orientation_is_applied():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = 255  # bright stripe on the left of the stored pixels
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    out = decode_gray(buf.getvalue())
    assert (out.width, out.height) == (20, 40)
    # after a clockwise turn the stored left stripe is on top
    assert out.gray[:8].mean() > 200 and out.gray[-8:].mean() < 50


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _stripe_png_with_exif(where: str) -> bytes:
    """A 20 x 40 PNG, bright on its stored left, whose eXIf chunk (orientation 6) is before or after its pixels."""
    arr = np.zeros((20, 40), np.uint8)
    arr[:, :10] = 255
    png = _png(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    chunk = _chunk(b"eXIf", exif.tobytes())
    at = png.index(b"IDAT") - 4 if where == "before" else len(png) - 12  # before IDAT, or just before IEND
    return png[:at] + chunk + png[at:]


@pytest.mark.parametrize("where", ["before", "after"])
def test_png_exif_orientation_is_applied_wherever_the_chunk_is(where):
    out = decode_gray(_stripe_png_with_exif(where))
    assert (out.width, out.height) == (20, 40)
    assert out.gray[:8].mean() > 200 and out.gray[-8:].mean() < 50


def test_a_png_without_exif_is_decoded_once(monkeypatch):
    """PIL finds a PNG's EXIF by decoding all its pixels; a PNG with no chunk that can hold EXIF skips that."""
    from PIL import ImageFile

    loads = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: loads.append(im.format) or real(im))
    out = decode_gray(_png(np.full((30, 50, 3), 90, np.uint8)))
    assert out.gray.shape == (30, 50) and loads == []
    decode_gray(_stripe_png_with_exif("after"))
    assert loads == ["PNG"]  # where EXIF may follow the pixels, PIL still looks


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")
    )


def test_pixel_bomb_is_refused_from_the_header():
    with pytest.raises(ImageError, match="too many pixels"):
        decode_gray(_png_header_only(100_000, 100_000))


@pytest.mark.parametrize(
    "data,reason",
    [(b"", "empty"), (b"hello, not an image", "not an image"), (b"\xff\xd8\xff\xe0" + b"\x00" * 20, "not an image")],
)
def test_junk_is_refused_with_a_reason(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_gray(data)


def test_truncated_jpeg_is_refused_or_decoded_partially(sample_dir):
    data = (sample_dir / "photos" / "obamas.jpg").read_bytes()
    with pytest.raises(ImageError):
        decode_gray(data[:200])


def test_list_images_is_sorted_filtered_and_recursive(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/z.JPG", "a.png", "notes.txt", "b/c.jpeg"):
        (tmp_path / name).write_bytes(b"x")
    found = list_images(str(tmp_path))
    assert [p.rsplit("/", 1)[-1] for p in found] == ["a.png", "c.jpeg", "z.JPG"]
    assert list_images(str(tmp_path / "a.png")) == [str(tmp_path / "a.png")]
    with pytest.raises(FileNotFoundError):
        list_images(str(tmp_path / "missing"))


def test_read_missing_file_names_it(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        read_gray(str(tmp_path / "nope.jpg"))


def test_iter_read_keeps_order_and_reports_errors_over_a_remote_filesystem():
    import fsspec

    from fkd_core.storage import iter_read

    fs = fsspec.filesystem("memory")
    uris = []
    for i in range(40):
        fs.pipe_file(f"/bucket/img{i:02d}.jpg", bytes([i]) * (i + 1))
        uris.append(f"memory://bucket/img{i:02d}.jpg")
    uris.insert(7, "memory://bucket/missing.jpg")
    got = list(iter_read(uris, max_bytes=30, window=4))
    assert [u for u, _ in got] == uris
    by_uri = dict(got)
    assert isinstance(by_uri["memory://bucket/missing.jpg"], ImageError)
    assert by_uri["memory://bucket/img03.jpg"] == bytes([3]) * 4
    assert isinstance(by_uri["memory://bucket/img35.jpg"], ImageError)  # 36 bytes > max_bytes
    assert "larger than 30 bytes" in str(by_uri["memory://bucket/img35.jpg"])


def test_a_link_out_of_a_directory_is_not_read(tmp_path):
    """Listing skips links that leave the source unless asked to follow them; reading a CSV's names under an
    images directory never opens what a link there leads to outside it."""
    from fkd_core.image_io import list_source
    from fkd_core.storage import read_under

    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"\xff\xd8\xff secret")
    (src / "sub" / "in.jpg").write_bytes(b"\xff\xd8\xff inside")
    (src / "out.jpg").symlink_to(outside / "secret.jpg")
    (src / "in.jpg").symlink_to(src / "sub" / "in.jpg")
    (src / "dir").symlink_to(outside, target_is_directory=True)
    listing = list_source(str(src))
    assert [f.uri for f in listing.images] == [str(src / "in.jpg"), str(src / "sub" / "in.jpg")]
    assert listing.skipped == [
        (str(src / "dir"), f"link leaves the source (-> {outside})"),
        (str(src / "out.jpg"), f"link leaves the source (-> {outside / 'secret.jpg'})"),
    ]
    followed = list_source(str(src), links_out=True)
    assert len(followed.images) == 4 and followed.skipped == []
    reads = dict(read_under(str(src), ["in.jpg", "out.jpg", "dir/secret.jpg", "sub/in.jpg"]))
    assert reads["in.jpg"] == reads["sub/in.jpg"] == b"\xff\xd8\xff inside"
    for name in ("out.jpg", "dir/secret.jpg"):
        assert isinstance(reads[name], ImageError)
        assert str(reads[name]) == f"link leaves the images directory (-> {outside / 'secret.jpg'})"
    # asked to (ingest and evaluate's --follow-links-out: a symlinked dataset), links out are read
    followed_reads = dict(read_under(str(src), ["out.jpg", "dir/secret.jpg"], links_out=True))
    assert followed_reads == {"out.jpg": b"\xff\xd8\xff secret", "dir/secret.jpg": b"\xff\xd8\xff secret"}
