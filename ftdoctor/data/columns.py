"""Tables of examples — CSV, TSV, JSONL, parquet files and Hugging Face ``datasets`` folders — as splits.

A table has named columns. :func:`table_split` picks

* the **label** column: ``--label-column``, else the first of :data:`LABEL_COLUMNS` present;
* the **text** column(s): ``--text-column A`` (``A,B`` for sentence pairs), else the first of
  :data:`TEXT_COLUMNS` / :data:`PAIR_COLUMNS` present — a text split, tokenised later for the model
  (:mod:`.text`);
* else the **image** column: ``--image-column``, else the first of :data:`IMAGE_COLUMNS` present —
  image paths (relative to the table's folder) or encoded image bytes — an image split like any other.

Labels are class indices 0 … C−1, or strings mapped to indices in a stated order: the model's own
``label2id`` when the strings are its labels, else sorted order (the note lists the mapping). A class
list the table itself states (a ``datasets`` ``ClassLabel``) is used as it is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ftdoctor.errors import FtdoctorError

LABEL_COLUMNS = ("label", "labels", "target", "class", "category", "y")
TEXT_COLUMNS = ("text", "sentence", "content", "review", "document", "comment", "utterance")
PAIR_COLUMNS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question", "sentence"),
                ("question1", "question2"), ("text_a", "text_b"))
IMAGE_COLUMNS = ("image", "img", "image_path", "path", "file", "filepath", "filename")


class TextSplit:
    """Texts (or sentence pairs) and their labels; tokenised for the model by :mod:`.text`."""

    kind = "text"

    def __init__(self, texts: Sequence[str], pairs: Sequence[str] | None, labels: np.ndarray, num_classes: int,
                 columns: tuple[str, ...], class_names: Sequence[str] | None = None) -> None:
        self.texts, self.pairs = list(texts), (list(pairs) if pairs is not None else None)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.num_classes = num_classes
        self.columns = columns
        self.class_names = list(class_names) if class_names is not None else None

    def select(self, indices: np.ndarray) -> "TextSplit":
        pick = [int(i) for i in indices]
        return TextSplit([self.texts[i] for i in pick], [self.pairs[i] for i in pick] if self.pairs else None,
                         self.labels.numpy()[pick], self.num_classes, self.columns, self.class_names)


class ImageTableSplit:
    """Images named by a table: paths (read like an image folder's files) or encoded bytes, with labels."""

    resize_to_first = True   # images of other sizes are resized to the first one's

    def __init__(self, images: Sequence[Any], labels: np.ndarray, num_classes: int, base: Path,
                 class_names: Sequence[str] | None = None) -> None:
        self.images = list(images)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.num_classes = num_classes
        self.base = base
        self.class_names = list(class_names) if class_names is not None else None

    def select(self, indices: np.ndarray) -> "ImageTableSplit":
        return ImageTableSplit([self.images[int(i)] for i in indices], self.labels.numpy()[indices],
                               self.num_classes, self.base, self.class_names)

    def _image(self, i: int, header_only: bool = False) -> Any:
        from ftdoctor.data.folder import read_image, read_image_bytes

        item = self.images[i]
        if isinstance(item, (bytes, bytearray)):      # encoded image bytes (a parquet column)
            return read_image_bytes(bytes(item), f"image {i}", header_only)
        if isinstance(item, dict):             # a datasets Image feature, undecoded: {"bytes", "path"}
            if item.get("bytes"):
                return read_image_bytes(item["bytes"], f"image {i} ({item.get('path') or 'bytes'})", header_only)
            item = item.get("path")
        if not isinstance(item, str) or not item:
            raise FtdoctorError(f"row {i} has no image (got {type(item).__name__})",
                                "give every row an image path or image bytes")
        path = Path(item)
        return read_image(str(path if path.is_absolute() else self.base / path), header_only)

    def read(self, indices: Sequence[int]) -> list[Tensor]:
        from torchvision.transforms.functional import pil_to_tensor

        return [pil_to_tensor(self._image(int(i))).float().div_(255.0) for i in indices]

    def first_shape(self) -> tuple[int, int, int]:
        width, height = self._image(0, header_only=True)
        return 3, height, width


def _present(names: Sequence[str], wanted: Sequence[str]) -> str | None:
    lower = {n.lower(): n for n in names}
    return next((lower[w] for w in wanted if w in lower), None)


def _given(flag: str, value: str, names: Sequence[str], what: str) -> None:
    if value not in names:
        raise FtdoctorError(f"{flag} {value!r}: {what} has no such column (it has {', '.join(names)})",
                            f"pass {flag} with one of its columns")


def choose_columns(names: Sequence[str], opts: Any, what: str) -> tuple[str, tuple[str, ...], str | None]:
    """(label column, text columns, image column) of a table with columns ``names`` (see the module doc)."""
    label = getattr(opts, "label_column", None)
    if label:
        _given("--label-column", label, names, what)
    else:
        label = _present(names, LABEL_COLUMNS)
        if label is None:
            raise FtdoctorError(f"{what} has no label column (columns: {', '.join(names)})",
                                f"name it with --label-column (looked for {', '.join(LABEL_COLUMNS)})")
    given = getattr(opts, "text_column", None)
    if given:
        texts = tuple(c.strip() for c in given.split(",") if c.strip())
        if not 1 <= len(texts) <= 2:
            raise FtdoctorError(f"--text-column {given!r} names {len(texts)} columns",
                                "give one text column, or two for sentence pairs: --text-column A,B")
        for column in texts:
            _given("--text-column", column, names, what)
        return label, texts, None
    image = getattr(opts, "image_column", None)
    if image:
        _given("--image-column", image, names, what)
        return label, (), image
    for first, second in PAIR_COLUMNS:
        a, b = _present(names, (first,)), _present(names, (second,))
        if a and b:
            return label, (a, b), None
    text = _present(names, TEXT_COLUMNS)
    if text is not None:
        return label, (text,), None
    image = _present([n for n in names if n != label], IMAGE_COLUMNS)
    if image is not None:
        return label, (), image
    raise FtdoctorError(f"{what} has no text or image column (columns: {', '.join(names)})",
                        "name it: --text-column COLUMN (A,B for pairs) or --image-column COLUMN")


def encode_labels(values: Sequence[Any], what: str, column: str, class_names: Sequence[str] | None = None,
                  model_labels: Sequence[str] | None = None) -> tuple[np.ndarray, int, list[str] | None, str | None]:
    """Labels as class indices, the class count, the class names (string labels) and a note on the mapping."""
    from ftdoctor.safety import check_class_count

    if any(v is None for v in values):
        row = next(i for i, v in enumerate(values) if v is None)
        raise FtdoctorError(f"{what}: row {row} has no {column}", "give every row a label")
    if class_names is not None:                    # stated by the table (a ClassLabel): indices already
        labels = np.asarray(values, dtype=np.int64)
        return labels, check_class_count(len(class_names), what), list(class_names), None
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        from ftdoctor.safety import MAX_CLASSES

        big = next((v for v in values if int(v) >= MAX_CLASSES), None)
        if big is not None:
            raise FtdoctorError(f"{what}: label {big} in {column} implies more classes than ftdoctor handles "
                                f"({MAX_CLASSES:,})", "labels must be class indices 0 … C−1 (or class names)")
        labels = np.asarray(values, dtype=np.int64)
        if labels.size and labels.min() < 0:
            raise FtdoctorError(f"{what}: label {int(labels.min())} in {column} is negative",
                                "labels must be class indices 0 … C−1 or class names")
        return labels, check_class_count(int(labels.max()) + 1 if labels.size else 0, what), None, None
    if all(isinstance(v, str) for v in values):
        found = sorted(set(values))
        if model_labels and set(found) <= set(model_labels):
            names, how = list(model_labels), "the model's label2id"
        else:
            names, how = found, "sorted order"
        index = {n: i for i, n in enumerate(names)}
        shown = ", ".join(f"{n}={index[n]}" for n in names[:8]) + (", …" if len(names) > 8 else "")
        labels = np.asarray([index[v] for v in values], dtype=np.int64)
        return labels, check_class_count(len(names), what), names, f"{what}: labels in {column} mapped in {how}: {shown}"
    kinds = sorted({type(v).__name__ for v in values})
    raise FtdoctorError(f"{what}: the labels in {column} are {', '.join(kinds)}, not class indices or names",
                        "use integer labels 0 … C−1 or one string per class")


def table_split(columns: Callable[[str], Sequence[Any]], names: Sequence[str], opts: Any, what: str, base: Path,
                notes: list[str], class_names: dict[str, list[str]] | None = None) -> Any:
    """The split of a table whose column ``c`` is ``columns(c)`` (see the module doc); notes say what was read."""
    label, texts, image = choose_columns(names, opts, what)
    labels, count, mapped, note = encode_labels(list(columns(label)), what, label,
                                                (class_names or {}).get(label), getattr(opts, "class_names", None))
    if note:
        notes.append(note)
    if texts:
        values = [list(columns(c)) for c in texts]
        for column, items in zip(texts, values):
            bad = next((i for i, v in enumerate(items) if not isinstance(v, str)), None)
            if bad is not None:
                raise FtdoctorError(f"{what}: row {bad} of {column} is {type(values[0][bad]).__name__}, not text",
                                    "give every row a text (an empty string for none)")
        notes.append(f"{what}: text from {' + '.join(texts)}, labels from {label}")
        return TextSplit(values[0], values[1] if len(values) > 1 else None, labels, count, texts, mapped)
    notes.append(f"{what}: images from {image}, labels from {label}")
    return ImageTableSplit(list(columns(image)), labels, count, base, mapped)  # type: ignore[arg-type]
