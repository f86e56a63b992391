"""Real files of the formats phones and cameras write, made from a sample dog photo with the encoders of the test
extras: HEIC (pillow-heif, never registered as an opener: the project reads with pi-heif), AVIF (Pillow), JPEG XL
(imagecodecs) and DNG (pidng: a Bayer mosaic, with or without an embedded JPEG preview).

Each maker takes an upright RGB photo and an EXIF orientation: orientation 6 stores the pixels sideways and
records the turn the way the format does (HEIC irot + EXIF, AVIF irot, JPEG XL codestream, DNG Orientation tag),
so a decoder that ignores it returns the photo on its side.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                       [0.2126729, 0.7151522, 0.0721750],
                       [0.0193339, 0.1191920, 0.9503041]])


def _stored(upright: Image.Image, orientation: int) -> Image.Image:
    assert orientation in (1, 6)
    return upright if orientation == 1 else upright.transpose(Image.Transpose.ROTATE_90)  # 6 turns it back


def _exif(orientation: int) -> Image.Exif:
    ex = Image.Exif()
    ex[0x0112] = orientation
    return ex


def heic(upright: Image.Image, orientation: int = 1) -> bytes:
    import pillow_heif

    im = _stored(upright, orientation)
    buf = io.BytesIO()
    # from_bytes, not from_pillow: from_pillow would bake the orientation into the pixels
    pillow_heif.from_bytes("RGB", im.size, im.tobytes()).save(buf, quality=85, exif=_exif(orientation).tobytes())
    return buf.getvalue()


def avif(upright: Image.Image, orientation: int = 1) -> bytes:
    buf = io.BytesIO()
    _stored(upright, orientation).save(buf, "AVIF", quality=75, exif=_exif(orientation))
    return buf.getvalue()


def jxl(upright: Image.Image, orientation: int = 1, container: bool = False) -> bytes:
    import imagecodecs

    if orientation == 1:
        return bytes(imagecodecs.jpegxl_encode(np.asarray(upright), distance=1.0, effort=5, usecontainer=container))
    buf = io.BytesIO()  # libjxl takes the orientation from a JPEG's EXIF when it recompresses the JPEG
    _stored(upright, orientation).save(buf, "JPEG", quality=95, exif=_exif(orientation))
    return bytes(imagecodecs.jpegxl_encode_jpeg(buf.getvalue()))


def _mosaic(rgb: Image.Image, white: int) -> np.ndarray:
    """sRGB -> a linear RGGB Bayer mosaic, as if from a sensor whose primaries are sRGB's."""
    a = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(a <= 0.04045, a / 12.92, ((a + 0.055) / 1.055) ** 2.4)
    h, w = lin.shape[0] & ~1, lin.shape[1] & ~1
    lin, raw = lin[:h, :w], np.empty((h, w))
    raw[0::2, 0::2], raw[0::2, 1::2] = lin[0::2, 0::2, 0], lin[0::2, 1::2, 1]
    raw[1::2, 0::2], raw[1::2, 1::2] = lin[1::2, 0::2, 1], lin[1::2, 1::2, 2]
    return np.round(raw * white).astype(np.uint16)


def _raw_tags(w: int, h: int, orientation: int, white: int):
    from pidng.core import DNGTags, Tag
    from pidng.defs import CalibrationIlluminant, CFAPattern, DNGVersion, PhotometricInterpretation

    t = DNGTags()
    for tag, value in [
        (Tag.ImageWidth, w), (Tag.ImageLength, h), (Tag.TileWidth, w), (Tag.TileLength, h),
        (Tag.Orientation, orientation), (Tag.PhotometricInterpretation, PhotometricInterpretation.Color_Filter_Array),
        (Tag.SamplesPerPixel, 1), (Tag.BitsPerSample, 12), (Tag.CFARepeatPatternDim, [2, 2]),
        (Tag.CFAPattern, CFAPattern.RGGB), (Tag.BlackLevel, 0), (Tag.WhiteLevel, white),
        (Tag.ColorMatrix1, [[int(round(v * 10000)), 10000] for v in np.linalg.inv(RGB_TO_XYZ).flatten()]),
        (Tag.CalibrationIlluminant1, CalibrationIlluminant.D65), (Tag.AsShotNeutral, [[1, 1], [1, 1], [1, 1]]),
        (Tag.BaselineExposure, [[0, 1]]), (Tag.Make, "dogbreed"), (Tag.Model, "test camera"),
        (Tag.UniqueCameraModel, "dogbreed test camera"), (Tag.DNGVersion, DNGVersion.V1_4),
        (Tag.DNGBackwardVersion, DNGVersion.V1_0),
    ]:
        t.set(tag, value)
    return t


def dng(upright: Image.Image, orientation: int = 1, preview: bool = False) -> bytes:
    """A 12-bit DNG at twice the photo's size (a half-size development gives the photo back); with `preview`, IFD0
    is a JPEG preview at the photo's size and the mosaic sits in a SubIFD, as cameras and Lightroom write them."""
    stored = _stored(upright, orientation)
    big = stored.resize((stored.width * 2, stored.height * 2), Image.Resampling.BICUBIC)
    raw = _mosaic(big, 4095)
    h, w = raw.shape
    tags = _raw_tags(w, h, orientation, 4095)
    if not preview:
        from pidng.core import RAW2DNG

        r = RAW2DNG()
        r.options(tags, path="", compress=False)
        return bytes(r.convert(raw))
    from pidng.core import Tag
    from pidng.dng import DNG, Type, dngIFD, dngTag
    from pidng.packing import pack12

    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    d = DNG()
    d.ImageDataStrips += [pack12(raw).tobytes(), jpeg]
    raw_ifd, raw_off = dngIFD(), dngTag(Tag.TileOffsets, [0])
    raw_ifd.tags += [raw_off, dngTag(Tag.NewSubfileType, [0]), dngTag(Tag.TileByteCounts, [len(d.ImageDataStrips[0])]),
                     dngTag(Tag.Compression, [1])]
    top = {Tag.Orientation, Tag.Make, Tag.Model, Tag.UniqueCameraModel, Tag.DNGVersion, Tag.DNGBackwardVersion,
           Tag.ColorMatrix1, Tag.CalibrationIlluminant1, Tag.AsShotNeutral, Tag.BaselineExposure}
    raw_ifd.tags += [t for t in tags.list() if t.Type not in top]
    sub = dngTag(Tag.NewSubfileType, [0])  # pidng 4.0.9's dngTag(Tag.SubIFD, ...) fails: a SubIFDs tag by hand
    sub.Type, sub.TagId, sub.DataType, sub.DataCount = Tag.SubIFD, Tag.SubIFD[0], Type.IFD, 1
    sub.subIFD, sub.Value, sub.DataLength, sub.selfContained = raw_ifd, b"\0\0\0\0", 4, True
    ifd0, prev_off = dngIFD(), dngTag(Tag.StripOffsets, [0])
    pw, ph = stored.size
    ifd0.tags += [dngTag(Tag.NewSubfileType, [1]), dngTag(Tag.ImageWidth, [pw]), dngTag(Tag.ImageLength, [ph]),
                  dngTag(Tag.BitsPerSample, [8, 8, 8]), dngTag(Tag.Compression, [7]),
                  dngTag(Tag.PhotometricInterpretation, [6]), dngTag(Tag.SamplesPerPixel, [3]),
                  dngTag(Tag.RowsPerStrip, [ph]), prev_off, dngTag(Tag.StripByteCounts, [len(jpeg)]), sub]
    ifd0.tags += [t for t in tags.list() if t.Type in top]
    d.IFDs.append(ifd0)
    out = bytearray(d.dataLen())
    raw_off.setValue([d.StripOffsets[0]])
    prev_off.setValue([d.StripOffsets[1]])
    d.setBuffer(out)
    d.write()
    return bytes(out)


MAKERS = {"heic": heic, "avif": avif, "jxl": jxl, "dng": dng}
