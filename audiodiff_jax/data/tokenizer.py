"""Caption tokenizer (the contract between the data, the trainer and the sampler).

Ids are fixed across the project: pad = 0 (the text encoder masks id 0), unk = 1,
bos = 2, eos = 3. A caption encodes to its ids, then EOS, then zeros up to
``max_len``; the empty caption (the classifier-free-guidance null caption) is
``[EOS, 0, 0, ...]``, so the null condition still has one unmasked token.
Training a tokenizer is pipeline work: ``data_pipeline/tokenizer.py``.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable

import numpy as np
import sentencepiece as spm
from etils import epath

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
DEFAULT_FILE = "tokenizer.model"


class Tokenizer:
    """A trained sentencepiece model with fixed-length encoding.

    Picklable (it carries the model bytes), so Grain worker processes can use it.
    """

    def __init__(self, path: str, *, model_bytes: bytes | None = None):
        self.path = path
        if model_bytes is None:
            model_bytes = epath.Path(path).read_bytes()  # local or gs://
        self._model = model_bytes
        self._load()

    @property
    def model_bytes(self) -> bytes:
        """The serialized sentencepiece model (what checkpoints carry)."""
        return self._model

    def to_json(self) -> dict:
        """A JSON-able copy of the model: saved with every checkpoint (item ``tokenizer``)."""
        return {
            "file": os.path.basename(self.path),
            "sha256": hashlib.sha256(self._model).hexdigest(),
            "vocab_size": self.vocab_size,
            "model_base64": base64.b64encode(self._model).decode("ascii"),
        }

    @classmethod
    def from_json(cls, data: dict, where: str) -> Tokenizer:
        """Inverse of :meth:`to_json`; ``where`` names the source in errors."""
        try:
            model = base64.b64decode(data["model_base64"], validate=True)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: tokenizer item has no readable model_base64 ({e})") from e
        if hashlib.sha256(model).hexdigest() != data.get("sha256"):
            raise ValueError(f"{where}: tokenizer model does not match its sha256 (corrupt checkpoint item)")
        return cls(f"{where}:{data.get('file', 'tokenizer.model')}", model_bytes=model)

    def _load(self) -> None:
        self._sp = spm.SentencePieceProcessor(model_proto=self._model)
        ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(
                f"{self.path}: sentencepiece pad/unk/bos/eos ids are {ids}, expected "
                f"{(PAD_ID, UNK_ID, BOS_ID, EOS_ID)} (the model masks id 0 as padding)"
            )

    @property
    def vocab_size(self) -> int:
        return int(self._sp.vocab_size())

    def encode(self, text: str, max_len: int) -> np.ndarray:
        """Returns int32 ``[max_len]``: ids, EOS, zeros. Long captions are cut to keep EOS last."""
        if max_len < 1:
            raise ValueError(f"max_len={max_len} must be >= 1")
        ids = self._sp.encode(text, out_type=int)[: max_len - 1]
        out = np.zeros(max_len, np.int32)
        out[: len(ids)] = ids
        out[len(ids)] = EOS_ID
        return out

    def length(self, text: str) -> int:
        """Tokens ``text`` takes with its EOS (uncut: what ``encode`` needs as ``max_len``)."""
        return len(self._sp.encode(text, out_type=int)) + 1

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) > EOS_ID])

    def __getstate__(self):
        return {"path": self.path, "_model": self._model}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load()
