"""Text examples as model inputs: tokenised with the model folder's own tokenizer, padded, masked.

The tokenizer is the one in the model's folder (``tokenizer.json``, ``vocab.txt``, ... beside
``config.json``), or ``--tokenizer DIR``; it is loaded from local files only
(``AutoTokenizer.from_pretrained(DIR, local_files_only=True)``), never with code from the folder.
Every kept example is tokenised once, truncated to ``--max-length`` tokens (default: what the
tokenizer and the model's position embeddings allow, at most :data:`DEFAULT_MAX_LENGTH`), and padded
to the longest example. Item ``i`` is ``({"input_ids", "attention_mask", ...}, y, i)``: the model is
called with these keywords (:func:`ftdoctor.forward.logits`), and a padded position has
``attention_mask`` 0 — no attention reaches it, so it contributes nothing to any figure (the
activation R² leaves such positions out: :mod:`ftdoctor.probes.r2`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import Tensor
from torch.utils.data import Dataset

from ftdoctor.errors import FtdoctorError

DEFAULT_MAX_LENGTH = 512

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model", "merges.txt")


#: a tokenizer file larger than this is not one (the largest vocabularies take tens of MB)
MAX_TOKENIZER_BYTES = 256 * 2**20


def has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in _TOKENIZER_FILES)


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer stored in ``folder``, from local files only; FtdoctorError when there is none."""
    if not has_tokenizer(folder):
        raise FtdoctorError(f"text data needs a tokenizer, and {folder} has none ({', '.join(_TOKENIZER_FILES[:3])})",
                            "save the tokenizer into the model folder (tokenizer.save_pretrained(FOLDER)) or pass "
                            "--tokenizer DIR")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise FtdoctorError("tokenising text needs the transformers package, which is not installed",
                            "install it: pip install 'ftdoctor[hf]'") from None
    from ftdoctor.checkpoint.hf import _silent
    from ftdoctor.safety import regular_file

    for name in _TOKENIZER_FILES:
        if (folder / name).exists():
            size = regular_file(folder / name, "the tokenizer file").st_size
            if size > MAX_TOKENIZER_BYTES:
                raise FtdoctorError(f"the tokenizer file {folder / name} is {size} bytes, more than a tokenizer "
                                    f"holds ({MAX_TOKENIZER_BYTES // 2**20} MiB)",
                                    "check that the folder holds what it says, or pass --tokenizer DIR")
    try:
        with _silent():
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - the library's many error types for a bad tokenizer
        raise FtdoctorError(f"cannot load the tokenizer in {folder}: {type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]}",
                            "save it again with tokenizer.save_pretrained, or pass --tokenizer DIR") from None


class TokenDataset(Dataset):
    """Tokenised examples: item ``i`` is ``({name: tensor[L]}, label, i)``."""

    kind = "text"

    def __init__(self, encoded: dict[str, Tensor], labels: Tensor, num_classes: int) -> None:
        self.encoded = encoded
        self.labels = labels
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[dict[str, Tensor], int, int]:
        i = int(i)
        return {k: v[i] for k, v in self.encoded.items()}, int(self.labels[i]), i

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[dict[str, Tensor], int, int]]:
        return [self[i] for i in indices]


def encode(split: Any, tokenizer: Any, max_length: int | None, model_limit: int | None,
           notes: list[str]) -> TokenDataset:
    """Tokenise ``split`` (a :class:`~.columns.TextSplit`) for the model (see the module doc)."""
    limits = [n for n in (getattr(tokenizer, "model_max_length", None), model_limit) if isinstance(n, int) and
              0 < n < 1_000_000]
    limit = min([DEFAULT_MAX_LENGTH, *limits])
    if max_length is not None:
        if max_length > min(limits, default=max_length):
            raise FtdoctorError(f"--max-length {max_length} is longer than the model takes ({min(limits)} tokens)",
                                f"pass --max-length {min(limits)} or less")
        limit = max_length
    if tokenizer.pad_token is None:
        raise FtdoctorError("the tokenizer has no padding token, so examples of different lengths cannot be "
                            "batched", "set one in its tokenizer_config.json (pad_token), e.g. the eos token")
    args = (split.texts, split.pairs) if split.pairs is not None else (split.texts,)
    # one token more than the limit tells a truncated example from one that fits, without tokenising it whole
    probe = tokenizer(*args, truncation=True, max_length=limit + 1, padding=False)["input_ids"]
    cut = sum(len(ids) > limit for ids in probe)
    encoded = tokenizer(*args, truncation=True, max_length=limit, padding="longest", return_tensors="pt")
    tensors = {k: v for k, v in encoded.items() if isinstance(v, Tensor)}
    if "attention_mask" not in tensors:
        raise FtdoctorError("the tokenizer gives no attention mask", "use a tokenizer that returns attention_mask")
    length = int(tensors["input_ids"].shape[1])
    notes.append(f"text tokenised with the model's tokenizer ({type(tokenizer).__name__}): {length} tokens at most"
                 + (f", {cut} of {len(probe)} examples truncated to --max-length {limit}" if cut else ""))
    return TokenDataset(tensors, split.labels, split.num_classes)
