"""Training text with nothing to download: by default the source of Python's own standard library,
read from the running interpreter, as byte-level tokens (vocabulary 256). `--data` takes a text file
or a folder of them instead. Batches are a pure function of (seed, step), so a resumed run sees
exactly the batches the uninterrupted run would have."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import List, Optional

import torch

DEFAULT_CORPUS_BYTES = 8 * 2**20
VAL_FRACTION = 0.05


class DataError(ValueError):
    """A data problem the user must fix (missing path, corpus too short...)."""


def _read_files(paths: List[Path], limit: int) -> bytes:
    chunks, total = [], 0
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return b"\n".join(chunks)[:limit]


def stdlib_corpus(limit: int = DEFAULT_CORPUS_BYTES) -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    return _read_files(files, limit)


def docs_corpus() -> bytes:
    """English prose that ships with Python and lies outside the main job's corpus: the documentation
    topics `help()` shows (pydoc_data, about half a megabyte of the language reference). A byte-level
    model pretrained on the standard library's code already models it about as well as code (its
    docstrings and comments are English), so it is the milder of the fine-tuning domains."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return b""
    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


def unicode_names_corpus() -> bytes:
    """The names of the Unicode characters (Python's unicodedata), one per line, in a fixed shuffled
    order so that the training, validation and test splits come from one distribution: an English
    vocabulary and register that source code hardly holds (LATIN SMALL LETTER A WITH GRAVE, ...), about
    0.8 MB once the names made by a formula (CJK UNIFIED IDEOGRAPH-4E00, HANGUL SYLLABLE ...) are left
    out. The default fine-tuning domain: a model pretrained on code starts clearly worse on it."""
    import random
    import re
    import unicodedata

    formula = re.compile(r"-[0-9A-F]{4,5}$|^HANGUL SYLLABLE ")
    names = [unicodedata.name(chr(i), "") for i in range(0x20, 0x110000)]
    names = [n for n in names if n and not formula.search(n)]
    random.Random(0).shuffle(names)
    return "\n".join(names).encode("ascii")


DOMAINS = {"unicode-names": unicode_names_corpus, "python-docs": docs_corpus}


def load_corpus(data: Optional[str], limit: int = DEFAULT_CORPUS_BYTES) -> bytes:
    if data is None:
        corpus = stdlib_corpus(limit)
        if not corpus:
            raise DataError("the embedded corpus (Python's standard library sources) was not found; pass --data")
        return corpus
    path = Path(data)
    if not path.exists():
        raise DataError(f"--data: {data} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        corpus = _read_files(files, limit)
    else:
        corpus = _read_files([path], limit)
    if not corpus:
        raise DataError(f"--data: {data} holds no readable text")
    return corpus


def tokenize(corpus: bytes, model_path: Optional[str] = None) -> torch.Tensor:
    """Byte-level tokens (our models), or the tokenizer saved with a Hugging Face model."""
    if model_path is None:
        return torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    return torch.tensor(tokenizer(corpus.decode("utf-8", errors="replace"))["input_ids"], dtype=torch.long)


class TokenDataset:
    """Training text and held-out windows. With `test_fraction`, a test split is cut from the end as well
    (fine-tuning chooses its learning rate on the validation split and reports the test split); without
    it the splits are exactly the main job's."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, device="cpu", test_fraction: float = 0.0):
        n_test = max(int(len(tokens) * test_fraction), seq_len + 1) if test_fraction > 0 else 0
        self.test = tokens[len(tokens) - n_test :] if n_test else tokens[:0]
        tokens = tokens[: len(tokens) - n_test]
        n_val = max(int(len(tokens) * VAL_FRACTION), seq_len + 1)
        self.train = tokens[:-n_val]
        self.val = tokens[-n_val:]
        self.seq_len = seq_len
        self.device = torch.device(device)
        splits = (("training", self.train), ("validation", self.val)) + ((("test", self.test),) if n_test else ())
        for name, split in splits:
            if len(split) < seq_len + 1:
                raise DataError(
                    f"--seq-len {seq_len} is longer than the {name} text ({len(split)} tokens); "
                    "use a shorter --seq-len or more --data"
                )

    def batch(self, step: int, batch_size: int, seed: int, split: str = "train") -> torch.Tensor:
        tokens = self.train if split == "train" else self.val
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 2 + (split != "train"))
        starts = torch.randint(0, len(tokens) - self.seq_len, (batch_size,), generator=g)
        rows = torch.stack([tokens[s : s + self.seq_len + 1] for s in starts.tolist()])
        return rows.to(self.device, non_blocking=True)

    def val_batches(self, batch_size: int, max_batches: int, split: str = "val"):
        """Fixed, non-overlapping windows of the validation (or test) text."""
        text = self.test if split == "test" else self.val
        windows = (len(text) - 1) // self.seq_len
        starts = [i * self.seq_len for i in range(min(windows, batch_size * max_batches))]
        for i in range(0, len(starts), batch_size):
            rows = torch.stack([text[s : s + self.seq_len + 1] for s in starts[i : i + batch_size]])
            yield rows.to(self.device)


def describe(data: Optional[str]) -> str:
    return "Python standard library sources (bytes)" if data is None else os.fspath(data)
