"""Loading images from disk or memory into RGB PIL images.

Meta's reference (llama-models chat format) opens an image with PIL and calls
``convert("RGB")``, which drops any alpha channel; transformers' Mllama processor instead
composites transparency onto white. :func:`load_image` follows Meta by default
(``alpha="drop"``) and offers ``alpha="white"`` for the transformers behaviour.

Everything that can go wrong while reading or decoding (missing file, directory, random
bytes, truncated data, decompression bombs) is reported as one :class:`ImageLoadError`
whose message names the file and the cause, instead of an exception raised from deep
inside a PIL decoder.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import BinaryIO, Literal, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]
AlphaMode = Literal["drop", "white"]

# Integer modes whose samples are wider than 8 bits. PIL's own convert("RGB") clamps their
# samples to 0..255, which turns an ordinary 16-bit PNG into an almost white image.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageLoadError(ValueError):
    """An image could not be read or decoded.

    Constructible from the message alone (and so picklable), as DataLoader workers need
    when they hand an exception back to the main process.

    Attributes:
        source: printable name of what was being loaded (a path, or ``<N bytes ...>``).
        cause: the underlying exception (PIL or OS error) or a description, for debugging.
    """

    def __init__(self, message: str, *, source: str | None = None, cause: object = None):
        super().__init__(message)
        self.source = source
        self.cause = cause

    @classmethod
    def from_cause(cls, source: str, cause: BaseException | str) -> "ImageLoadError":
        reason = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        return cls(f"cannot load image {source}: {reason}", source=source, cause=cause)


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes in memory>"
    name = getattr(source, "name", None)
    return repr(name) if isinstance(name, str) else f"<{type(source).__name__} stream>"


def _read_bytes(source: ImageSource) -> bytes:
    """Read the whole encoded file first, so that no file handle stays open behind the image."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return f.read()
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if hasattr(source, "read"):
        data = source.read()
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("file object must be opened in binary mode")
        return bytes(data)
    raise TypeError(f"expected a path, bytes or a binary file object, got {type(source).__name__}")


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """Map 16-bit, 32-bit integer and float single-channel images to 8-bit ``L``.

    Deliberate deviation from Meta/transformers (both call PIL's convert, which clamps to
    0..255): 16-bit samples are rescaled with ``round(v * 255 / 65535)``; mode ``I`` is
    treated as 16-bit when any sample exceeds 255 (that is how PNG/TIFF 16-bit data often
    arrives) and as 8-bit otherwise; mode ``F`` is treated as [0, 1] data when its maximum
    is <= 1, else clamped to 0..255 like PIL.
    """
    values = np.asarray(image)
    if image.mode == "F":
        values = values.astype(np.float64)
        if values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0
        eight_bit = np.clip(np.nan_to_num(np.rint(values)), 0, 255).astype(np.uint8)
    else:
        values = values.astype(np.int64)
        if image.mode in _SIXTEEN_BIT_MODES or (values.size and values.max() > 255):
            values = (np.clip(values, 0, 65535) * 255 + 32767) // 65535
        eight_bit = np.clip(values, 0, 255).astype(np.uint8)
    return Image.fromarray(eight_bit, mode="L")


def to_rgb(image: Image.Image, alpha: AlphaMode = "drop") -> Image.Image:
    """Convert a PIL image of any mode to ``RGB``.

    Args:
        image: a PIL image in any mode (L, LA, P, RGBA, CMYK, I;16, I, F, 1, ...).
        alpha: ``"drop"`` (Meta's reference: discard transparency, keeping the colour
            under it) or ``"white"`` (transformers: composite onto an opaque white
            background).

    Returns:
        The same object when it is already RGB without transparency, else a new RGB image.
    """
    if alpha not in ("drop", "white"):
        raise ValueError(f"alpha must be 'drop' or 'white', got {alpha!r}")
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        image = _high_bit_depth_to_l(image)
    bands = image.getbands()
    has_alpha = "A" in bands or "a" in bands or image.info.get("transparency") is not None
    if not has_alpha:
        return image if image.mode == "RGB" else image.convert("RGB")
    # Going through RGBA resolves palettes, tRNS colour keys and premultiplied modes once,
    # and avoids PIL's warning about converting palette transparency straight to RGB.
    rgba = image.convert("RGBA")
    if alpha == "drop":
        return rgba.convert("RGB")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def load_image(source: ImageSource, alpha: AlphaMode = "drop") -> Image.Image:
    """Load and fully decode an image, apply its EXIF orientation and convert it to RGB.

    Args:
        source: a filesystem path, the encoded bytes, or a binary file object.
        alpha: how to treat transparency, see :func:`to_rgb` (default: Meta's "drop").

    Returns:
        A fully decoded ``RGB`` PIL image (size as displayed, i.e. after EXIF rotation).

    Raises:
        ImageLoadError: the file is missing or unreadable, is not an image, or is truncated
            or corrupt. The message names the source and the cause.
    """
    if alpha not in ("drop", "white"):
        raise ValueError(f"alpha must be 'drop' or 'white', got {alpha!r}")
    name = _describe(source)
    try:
        data = _read_bytes(source)
    except OSError as error:
        raise ImageLoadError.from_cause(name, error) from None
    if not data:
        raise ImageLoadError.from_cause(name, "the file is empty")
    try:
        image = Image.open(io.BytesIO(data))
        # PIL decodes lazily; load() forces the full decode now so truncated or corrupt
        # data fails here, with the file name, rather than later inside a resize. Strictly:
        # libraries imported alongside (lmms-eval does, at import) may set PIL's global
        # LOAD_TRUNCATED_IMAGES, which would pad a truncated file with grey instead.
        previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            image.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
    except Image.DecompressionBombError as error:
        raise ImageLoadError.from_cause(name, error) from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError.from_cause(name, "not a recognised image format") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as error:
        # Decoders signal damage with several exception types (OSError "image file is
        # truncated", SyntaxError for broken headers, ...).
        raise ImageLoadError.from_cause(name, error) from None
    try:
        # in_place: no copy of the whole image when there is nothing to rotate.
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as error:  # a malformed EXIF block should not make the pixels unusable
        warnings.warn(f"ignoring unreadable EXIF orientation of {name}: {error}", stacklevel=2)
    try:
        return to_rgb(image, alpha=alpha)
    except (OSError, ValueError) as error:
        raise ImageLoadError.from_cause(name, error) from None
