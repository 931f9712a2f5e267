"""core.images.decode_image and core.text.normalize against a corpus of bad and odd inputs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from rapid_pipeline.core.images import ImageLimits, ImageRejected, decode_image
from rapid_pipeline.core.text import TextRejected, decode_strict, normalize
from rapid_pipeline.demo import bomb_png, exif_rotated_jpeg


def _jpeg(size=(80, 80), colour=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).convert(mode).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _reason(data: bytes, limits=ImageLimits()) -> str:
    with pytest.raises(ImageRejected) as exc:
        decode_image(data, limits)
    return exc.value.reason


# --------------------------------------------------------------------------- images

@pytest.mark.parametrize("data, limits, reason", [
    (b"", ImageLimits(), "empty_image"),
    (b"not an image at all", ImageLimits(), "undecodable"),
    (_jpeg()[:300], ImageLimits(), "undecodable"),                       # truncated JPEG: never padded
    (bomb_png(), ImageLimits(), "too_many_pixels"),                      # header claims 100 MP, file is tiny
    (bomb_png(5000, 5000), ImageLimits(max_pixels=1_000_000), "too_many_pixels"),  # our cap, below PIL's
    (_jpeg(), ImageLimits(max_bytes=100), "too_many_bytes"),
    (_jpeg(), ImageLimits(formats=("PNG",)), "format_not_allowed"),
    (_jpeg((32, 32)), ImageLimits(min_side=64), "too_small"),
    (_jpeg((400, 64)), ImageLimits(max_aspect=3.0), "bad_aspect"),
])
def test_bad_images_have_reasons(data, limits, reason):
    assert _reason(data, limits) == reason


def test_bomb_png_is_tiny():
    assert len(bomb_png()) < 200


def test_modes_become_rgb():
    gray16 = io.BytesIO()
    Image.fromarray(np.full((70, 70), 65535, dtype=np.uint16)).save(gray16, "PNG")
    rgba = io.BytesIO()
    Image.new("RGBA", (70, 70), (0, 0, 255, 0)).save(rgba, "PNG")
    pal = io.BytesIO()
    Image.new("RGB", (70, 70), (10, 200, 10)).convert("P", palette=Image.Palette.ADAPTIVE).save(pal, "PNG")
    got = {k: decode_image(v) for k, v in {"cmyk": _jpeg(mode="CMYK"), "gray16": gray16.getvalue(), "rgba": rgba.getvalue(),
                                             "pal": pal.getvalue()}.items()}
    assert all(im.mode == "RGB" for im in got.values())
    r, g, b = got["cmyk"].getpixel((40, 40))
    assert r > 170 and g < 70 and b < 70
    assert got["gray16"].getpixel((1, 1)) == (255, 255, 255)
    assert got["rgba"].getpixel((1, 1)) == (255, 255, 255)  # fully transparent -> white, not blue
    assert got["pal"].getpixel((1, 1)) == (10, 200, 10)


def test_exif_orientation_is_applied():
    import random

    im = decode_image(exif_rotated_jpeg(random.Random(0)))
    assert im.size == (64, 128)
    assert im.getpixel((32, 5))[0] > 180 and im.getpixel((32, 122))[2] > 180


# --------------------------------------------------------------------------- text

def test_decode_strict_refuses_bad_bytes():
    with pytest.raises(TextRejected, match="invalid_utf8"):
        decode_strict(b"\xe8\x8d\x89\xff")
    with pytest.raises(TextRejected, match="nul_byte"):
        decode_strict("草\x00莓".encode())
    assert decode_strict("草莓".encode()) == "草莓"


@pytest.mark.parametrize("raw, reason", [
    ("", "empty_text"), ("   \t\n", "empty_text"), ("\u200b\u200d\ufeff", "empty_text"),
    ("草\x00莓", "nul_byte"), ("草" * 1_000_000, "too_long"),
])
def test_bad_captions(raw, reason):
    with pytest.raises(TextRejected) as exc:
        normalize(raw, max_chars=512)
    assert exc.value.reason == reason


@pytest.mark.parametrize("raw, text, simplified", [
    ("ＡＢＣ１２３：草莓", "ABC123:草莓", "ABC123:草莓"),                      # full-width -> ASCII
    ("一張蘋果的照片", "一張蘋果的照片", "一张苹果的照片"),                    # traditional kept, simplified column converts
    ("草\u200b莓\u200d蛋糕\ufeff", "草莓蛋糕", "草莓蛋糕"),                 # invisible characters removed
    ("  桌上 \t 放着\n一个\u3000苹果  ", "桌上 放着 一个 苹果", "桌上 放着 一个 苹果"),  # whitespace collapsed (ideographic space too)
    ("\u202e葡萄\u202c", "葡萄", "葡萄"),                                    # bidi controls
    ("㊙\ue000果", "秘果", "秘果"),                                          # compatibility form folded, private use dropped
])
def test_normalisation(raw, text, simplified):
    n = normalize(raw)
    assert (n.raw, n.text, n.simplified) == (raw, text, simplified)
