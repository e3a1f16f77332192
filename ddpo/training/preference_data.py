"""Offline preference pairs in Pick-a-Pic's layout (``train.algorithm=dpo``, ``train.preference_data``): read and
checked in full before the model loads (:func:`load_preference_data`), decoded a minibatch at a time while training
(:meth:`PreferencePairs.images`).

One row per pair, with Pick-a-Pic's column names (``yuvalkirstain/pickapic_v2``; its other columns are not read):

* ``caption``: the prompt, non-empty text;
* ``jpg_0``, ``jpg_1``: the two images: encoded image bytes (a parquet file, as Pick-a-Pic ships them; also the
  ``{"bytes": ..., "path": ...}`` struct of a Hugging Face ``Image`` column), or a file name relative to the folder
  of the table (any format Pillow reads: JPEG, PNG, ...);
* ``label_0``: 1 when ``jpg_0`` is preferred, 0 when ``jpg_1`` is, 0.5 for a tie. Ties are left out, as
  Diffusion-DPO leaves out Pick-a-Pic's "no decision" rows: a tie says neither image is better, and the loss has no
  term for it.

``train.preference_data`` is a table file (``.parquet``, ``.jsonl``, ``.csv``), or a folder holding either
``metadata.jsonl`` (the Hugging Face image-folder convention) with its images, or parquet files (Pick-a-Pic's shards,
read in name order). Every table is read into memory (with Pick-a-Pic's embedded images: use a subset of its shards
that fits). Every image is decoded once here, so
that a missing, unreadable or too small image stops the run before the model loads; while training each image is
centre-cropped to a square and resized (bilinear) to ``sample.resolution``, as Diffusion-DPO's training transform does
(without its random flip), and an image smaller than that is refused rather than upsampled.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
"""The columns read, Pick-a-Pic's names."""
METADATA_FILE = "metadata.jsonl"
"""The table of a folder of preference pairs."""
TABLE_SUFFIXES = (".parquet", ".jsonl", ".csv")
LABELS = (0.0, 0.5, 1.0)

ImageSource = bytes | Path
"""Encoded image bytes, or an image file."""


class PreferenceDataError(ValueError):
    """A problem with the preference data; the message names the file, the row and the fix."""


@dataclass(frozen=True)
class PreferencePairs:
    """The non-tied pairs of a preference dataset, preferred image first.

    Attributes:
        source: the path given (``train.preference_data``), for messages.
        captions: ``P`` prompts.
        preferred: ``P`` image sources, the preferred image of each pair.
        rejected: ``P`` image sources, the other one.
        ties: rows with ``label_0 = 0.5`` left out.
    """

    source: str
    captions: list[str]
    preferred: list[ImageSource]
    rejected: list[ImageSource]
    ties: int

    def __len__(self) -> int:
        return len(self.captions)

    def images(self, index: Sequence[int], size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The preferred and rejected images of pairs ``index``: two float32 ``[B, 3, size, size]`` tensors in
        ``[0, 1]`` (centre-cropped to a square, resized bilinearly when not already ``size``)."""
        preferred = torch.stack([to_tensor(open_image(self.preferred[k]), size) for k in index])
        rejected = torch.stack([to_tensor(open_image(self.rejected[k]), size) for k in index])
        return preferred, rejected


def open_image(source: ImageSource):
    """The RGB ``PIL.Image`` of ``source``, fully decoded."""
    from PIL import Image

    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        return image.convert("RGB")


def to_tensor(image, size: int) -> torch.Tensor:
    """``[3, size, size]`` float32 in ``[0, 1]`` of an RGB image: centre-cropped to a square and resized (bilinear)
    unless it is already ``size`` x ``size``."""
    import numpy as np
    from PIL import Image, ImageOps

    if image.size != (size, size):
        image = ImageOps.fit(image, (size, size), method=Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


def _tables(path: Path, key: str) -> list[Path]:
    """The tables of ``path``: itself for a table file; in a folder its ``metadata.jsonl``, else its ``*.parquet``
    files in name order (Pick-a-Pic's shards)."""
    if path.is_dir():
        if (path / METADATA_FILE).is_file():
            return [path / METADATA_FILE]
        shards = sorted(path.glob("*.parquet"))
        if not shards:
            raise PreferenceDataError(
                f"{key}: folder {str(path)!r} has neither {METADATA_FILE} nor .parquet files; write {METADATA_FILE} "
                f"with one JSON object a line with the columns {', '.join(COLUMNS)} (jpg_0 / jpg_1: image file names "
                "in the folder), or put Pick-a-Pic's parquet shards in it"
            )
        return shards
    if not path.exists():
        raise PreferenceDataError(
            f"{key}: {str(path)!r} does not exist; give a .parquet file or a folder of preference pairs"
        )
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise PreferenceDataError(
            f"{key}: {str(path)!r} is neither a folder of pairs nor a table file ({', '.join(TABLE_SUFFIXES)})"
        )
    return [path]


def _rows(table: Path, key: str) -> list[dict[str, Any]]:
    """The rows of a ``.jsonl``, ``.csv`` or ``.parquet`` table."""
    where = f"{key}: {str(table)!r}"
    try:
        if table.suffix.lower() == ".jsonl":
            rows = []
            for number, line in enumerate(table.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise PreferenceDataError(f"{where}, line {number}: expected a JSON object, got {row!r:.60}")
                    rows.append(row)
            return rows
        import pandas as pd

        if table.suffix.lower() == ".parquet":
            return pd.read_parquet(table).to_dict(orient="records")
        return pd.read_csv(table).to_dict(orient="records")
    except PreferenceDataError:
        raise
    except ImportError as err:
        raise PreferenceDataError(
            f"{where}: reading parquet needs pyarrow: pip install 'ddpo[parquet]' (or pip install pyarrow)"
        ) from err
    except UnicodeDecodeError as err:
        raise PreferenceDataError(f"{where} is not UTF-8 ({err.reason}); save it as UTF-8") from None
    except Exception as err:  # json's, pandas' and pyarrow's parser errors have no common base class
        first = str(err).splitlines()[0] if str(err) else ""
        raise PreferenceDataError(
            f"{where} cannot be read as {table.suffix.lower()[1:]} ({type(err).__name__}: {first}); check the file"
        ) from None


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _image_source(value: Any, folder: Path) -> ImageSource | None:
    """Bytes, a Hugging Face image struct or a file name (relative to ``folder``) as an :data:`ImageSource`."""
    if isinstance(value, dict):  # datasets' Image feature: {"bytes": b"..." or None, "path": "..." or None}
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str) and value.strip():
        return folder / value
    return None


def _check_image(source: ImageSource, size: int, where: str) -> None:
    """Decode ``source`` in full; refuse a missing file, an unreadable image or one smaller than ``size``."""
    if isinstance(source, Path) and not source.is_file():
        raise PreferenceDataError(f"{where}: image file {str(source)!r} is missing; add it or leave the row out")
    try:
        image = open_image(source)
    except Exception as err:  # Pillow raises several unrelated types for broken files
        shown = "its bytes" if isinstance(source, bytes) else repr(str(source))
        raise PreferenceDataError(
            f"{where}: {shown} cannot be read as an image ({type(err).__name__}: {err}); replace the file or leave the "
            "row out"
        ) from None
    width, height = image.size
    if min(width, height) < size:
        raise PreferenceDataError(
            f"{where}: the image is {width}x{height}, smaller than sample.resolution={size} that training crops and "
            f"resizes every image to; it would be upsampled. Set sample.resolution to at most {min(width, height)}, "
            "or leave the row out"
        )


def load_preference_data(
    path: str | Path, resolution: int, key: str = "train.preference_data", check_images: bool = True
) -> PreferencePairs:
    """Read and check a preference dataset (see the module docstring); raise :class:`PreferenceDataError` naming the
    file, the row and the fix when it cannot be read, lacks a column, holds no row or only ties, a caption is empty,
    a label is not 0, 0.5 or 1, or an image is missing, unreadable or smaller than ``resolution``
    (``check_images=False`` skips decoding the images)."""
    given = Path(path).expanduser()
    rows: list[tuple[dict[str, Any], Path, int]] = []  # (row, its table, its number in the table)
    for table in _tables(given, key):
        rows += [(row, table, number) for number, row in enumerate(_rows(table, key), start=1)]
    where = f"{key}: {str(given)!r}"
    if not rows:
        raise PreferenceDataError(f"{where} holds no row; add rows with the columns {', '.join(COLUMNS)}")
    columns = sorted({column for row, _, _ in rows for column in row})
    missing = [column for column in COLUMNS if column not in columns]
    if missing:
        raise PreferenceDataError(
            f"{where} has no {', '.join(repr(c) for c in missing)} column (its columns: {', '.join(columns)}); "
            f"preference pairs need Pick-a-Pic's columns {', '.join(COLUMNS)}"
        )
    captions, preferred, rejected, ties = [], [], [], 0
    for row, table, number in rows:
        at = f"{key}: {str(table)!r}, row {number}"
        caption, label = row.get("caption"), row.get("label_0")
        if _missing(caption) or not isinstance(caption, str) or not caption.strip():
            shown = "empty" if not caption else repr(caption)
            raise PreferenceDataError(f"{at}: the caption is {shown}; every pair needs its prompt as text")
        if isinstance(label, bool) or not isinstance(label, (int, float)) or float(label) not in LABELS:
            raise PreferenceDataError(
                f"{at}: label_0 is {label!r}; it must be 1 (jpg_0 preferred), 0 (jpg_1 preferred) or 0.5 (a tie)"
            )
        images = []
        for column in ("jpg_0", "jpg_1"):
            source = _image_source(row.get(column), table.parent)
            if source is None:
                raise PreferenceDataError(f"{at}: {column} is missing; give the image's bytes or its file name")
            if check_images:
                _check_image(source, resolution, f"{at}, {column}")
            images.append(source)
        if float(label) == 0.5:
            ties += 1
            continue
        first_wins = float(label) == 1.0
        captions.append(caption.strip())
        preferred.append(images[0] if first_wins else images[1])
        rejected.append(images[1] if first_wins else images[0])
    if not captions:
        raise PreferenceDataError(
            f"{where}: all {len(rows)} rows are ties (label_0 = 0.5), which training leaves out; give pairs with a "
            "preference"
        )
    return PreferencePairs(str(given), captions, preferred, rejected, ties)
