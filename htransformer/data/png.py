"""A small PNG encoder and decoder (numpy + zlib), for 8-bit images.

`encode_gray` writes 8-bit grayscale PNGs (colour type 0, filter 0 on every
row), which is what the Pathfinder generator needs. `decode` reads 8-bit
non-interlaced PNGs of colour type 0 (gray), 2 (RGB), 4 (gray + alpha) or 6
(RGBA) with any of the five row filters, which covers the images of the LRA
Pathfinder release; colour images are reduced to gray as
`tf.image.rgb_to_grayscale` does (`rgb_to_gray`). No third-party imaging library is
needed; where Pillow is installed it undoes the row filters (same pixels,
much faster for the Average and Paeth filters, which run pixel by pixel
here).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np

try:
  from PIL import Image as _PIL
except ImportError:  # Optional: the numpy decoder below does the same.
  _PIL = None

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}


def _chunk(kind: bytes, data: bytes) -> bytes:
  crc = zlib.crc32(kind + data) & 0xFFFFFFFF
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_gray(image: np.ndarray, level: int = 6) -> bytes:
  """uint8 [height, width] -> PNG bytes (8-bit grayscale)."""
  image = np.asarray(image)
  if image.ndim != 2 or image.dtype != np.uint8:
    raise ValueError(f"encode_gray needs a 2-D uint8 array, got "
                     f"{image.dtype} {image.shape}.")
  h, w = image.shape
  raw = np.zeros((h, w + 1), np.uint8)  # filter byte 0 (None) per row
  raw[:, 1:] = image
  header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
  return (_SIGNATURE + _chunk(b"IHDR", header)
          + _chunk(b"IDAT", zlib.compress(raw.tobytes(), level))
          + _chunk(b"IEND", b""))


# Paeth and Average depend on the pixel just decoded to the left, so they
# run pixel by pixel; on Python ints (several times faster than indexing
# numpy arrays element by element).


def _paeth_row(cur: np.ndarray, prev: np.ndarray, bpp: int) -> None:
  out, p = cur.tolist(), prev.tolist()
  for i in range(len(out)):
    b = p[i]
    if i >= bpp:
      a, c = out[i - bpp], p[i - bpp]
    else:
      a = c = 0
    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
    pred = a if (pa <= pb and pa <= pc) else (b if pb <= pc else c)
    out[i] = (out[i] + pred) & 0xFF
  cur[:] = out


def _average_row(cur: np.ndarray, prev: np.ndarray, bpp: int) -> None:
  out, p = cur.tolist(), prev.tolist()
  for i in range(len(out)):
    a = out[i - bpp] if i >= bpp else 0
    out[i] = (out[i] + ((a + p[i]) >> 1)) & 0xFF
  cur[:] = out


def _unfilter(data: np.ndarray, h: int, stride: int, bpp: int) -> np.ndarray:
  rows = data.reshape(h, stride + 1)
  filters = rows[:, 0]
  out = rows[:, 1:].copy()
  prev = np.zeros(stride, np.uint8)
  for y in range(h):
    f = filters[y]
    cur = out[y]
    if f == 0:
      pass
    elif f == 1:  # Sub: running sum (mod 256) within each channel
      if bpp == 1:
        np.cumsum(cur, dtype=np.uint8, out=cur)
      else:
        view = cur.reshape(-1, bpp)
        np.cumsum(view, axis=0, dtype=np.uint8, out=view)
    elif f == 2:  # Up
      cur += prev
    elif f == 3:
      _average_row(cur, prev, bpp)
    elif f == 4:
      _paeth_row(cur, prev, bpp)
    else:
      raise ValueError(f"PNG: unknown row filter {f}.")
    prev = cur
  return out


_PIL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def _pixels_pil(data: bytes, h: int, w: int, ch: int) -> np.ndarray | None:
  """[h, w, ch] uint8 pixels through Pillow, or None if it reads otherwise."""
  try:
    with _PIL.open(io.BytesIO(data)) as im:
      if im.mode != _PIL_MODES[ch] or im.size != (w, h):
        return None
      pixels = np.asarray(im, np.uint8)
  except Exception:  # Let the numpy decoder report the problem.
    return None
  return pixels.reshape(h, w, ch)


def decode(data: bytes) -> np.ndarray:
  """PNG bytes -> uint8 [height, width] (gray; colour is converted).

  Raises ValueError for anything that is not a readable PNG of the kinds
  above (bad signature, truncated or corrupt data).
  """
  if not data.startswith(_SIGNATURE):
    raise ValueError("not a PNG file (bad signature)")
  pos = len(_SIGNATURE)
  idat = []
  header = None
  while pos + 8 <= len(data):
    (length,) = struct.unpack(">I", data[pos:pos + 4])
    kind = data[pos + 4:pos + 8]
    body = data[pos + 8:pos + 8 + length]
    pos += 12 + length
    if kind == b"IHDR":
      if len(body) != 13:
        raise ValueError(f"PNG IHDR chunk of {len(body)} bytes, not 13 "
                         "(truncated file?)")
      header = struct.unpack(">IIBBBBB", body)
    elif kind == b"IDAT":
      idat.append(body)
    elif kind == b"IEND":
      break
  if header is None or not idat:
    raise ValueError("PNG without IHDR or IDAT (truncated file?)")
  w, h, depth, color, _, _, interlace = header
  if depth != 8 or color not in _CHANNELS or interlace:
    raise ValueError(f"unsupported PNG (bit depth {depth}, colour type "
                     f"{color}, interlace {interlace}); only 8-bit "
                     "non-interlaced gray/RGB(A) images are read.")
  ch = _CHANNELS[color]
  img = _pixels_pil(data, h, w, ch) if _PIL is not None else None
  if img is None:
    try:
      raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    except zlib.error as e:
      raise ValueError(f"PNG data is corrupt or truncated ({e})") from None
    if raw.size != h * (w * ch + 1):
      raise ValueError("PNG data has the wrong size (truncated file?)")
    img = _unfilter(raw, h, w * ch, ch).reshape(h, w, ch)
  if ch in (1, 2):
    return np.ascontiguousarray(img[..., 0])
  return rgb_to_gray(img[..., :3])


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> uint8 [...], as ``tf.image.rgb_to_grayscale``
  computes it (LRA's Image pipeline): in float32, pixels times 1/255, the
  ITU-R 601 weights, then times 255.5 and truncated."""
  flt = np.asarray(rgb, np.uint8).astype(np.float32) * np.float32(1 / 255)
  gray = flt @ np.array([0.2989, 0.5870, 0.1140], np.float32)
  return (gray * np.float32(255.5)).astype(np.uint8)
