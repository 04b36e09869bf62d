"""Caption tokenizer: trains a sentencepiece model and turns captions into fixed-length ids.

Ids are fixed across the project: pad = 0 (the text encoder masks id 0), unk = 1,
bos = 2, eos = 3. A caption encodes to its ids, then EOS, then zeros up to
``max_len``; the empty caption (the classifier-free-guidance null caption) is
``[EOS, 0, 0, ...]``, so the null condition still has one unmasked token.

Console script (trains on a dataset's captions and records the model in its card)::

    audiodiff-tokenizer --shards_dir=/data/latents --vocab_size=512
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
DEFAULT_FILE = "tokenizer.model"


def train_tokenizer(captions: Iterable[str], out_path_prefix: str, vocab_size: int) -> str:
    """Trains a unigram sentencepiece model on captions.

    ``vocab_size`` is an upper bound, not a promise: training uses
    ``hard_vocab_limit=False``, so a caption set too small to support that many
    pieces yields a smaller vocabulary instead of failing (read the real size from
    :attr:`Tokenizer.vocab_size`). It must still exceed the number of distinct
    characters in the captions plus the 4 special ids.

    Args:
      captions: training text, one caption per item (empty ones are skipped).
      out_path_prefix: writes ``out_path_prefix + ".model"`` (and ``.vocab``).
      vocab_size: the largest vocabulary wanted.

    Returns:
      Path of the ``.model`` file.
    """
    captions = [c for c in captions if c.strip()]
    if not captions:
        raise ValueError("train_tokenizer: no non-empty captions to train on")
    if vocab_size <= 4:
        raise ValueError(f"vocab_size={vocab_size} must be > 4 (ids 0-3 are pad/unk/bos/eos)")
    os.makedirs(os.path.dirname(os.path.abspath(out_path_prefix)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions),
        model_prefix=out_path_prefix,
        vocab_size=vocab_size,
        model_type="unigram",
        hard_vocab_limit=False,
        character_coverage=1.0,  # captions are short; keep every character rather than map some to unk
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        # Sentencepiece samples 1M sentences by default; captions can be more, and
        # shuffling keeps the sample representative when they are.
        input_sentence_size=1_000_000,
        shuffle_input_sentence=True,
        minloglevel=2,
    )
    return out_path_prefix + ".model"


class Tokenizer:
    """A trained sentencepiece model with fixed-length encoding.

    Picklable (it carries the model bytes), so Grain worker processes can use it.
    """

    def __init__(self, path: str, *, model_bytes: bytes | None = None):
        self.path = path
        if model_bytes is None:
            with open(path, "rb") as f:
                model_bytes = f.read()
        self._model = model_bytes
        self._load()

    @property
    def model_bytes(self) -> bytes:
        """The serialized sentencepiece model (what checkpoints carry)."""
        return self._model

    def to_json(self) -> dict:
        """A JSON-able copy of the model: saved with every checkpoint (item ``tokenizer``)."""
        import base64
        import hashlib

        return {
            "file": os.path.basename(self.path),
            "sha256": hashlib.sha256(self._model).hexdigest(),
            "vocab_size": self.vocab_size,
            "model_base64": base64.b64encode(self._model).decode("ascii"),
        }

    @classmethod
    def from_json(cls, data: dict, where: str) -> Tokenizer:
        """Inverse of :meth:`to_json`; ``where`` names the source in errors."""
        import base64
        import hashlib

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

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) > EOS_ID])

    def __getstate__(self):
        return {"path": self.path, "_model": self._model}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load()


def train_for_dataset(shards_dir: str, vocab_size: int, file_name: str = DEFAULT_FILE) -> str:
    """Trains on a dataset's captions and records the model in its dataset card.

    Returns:
      Path of the tokenizer model (inside ``shards_dir``).
    """
    from data_pipeline import shards  # here, to keep the tokenizer importable on its own

    if not file_name.endswith(".model") or os.path.basename(file_name) != file_name:
        raise ValueError(f"file_name={file_name!r} must be a plain '*.model' file name")
    card = shards.DatasetCard.load(shards_dir)
    path = train_tokenizer(
        shards.read_captions(shards_dir), os.path.join(shards_dir, file_name[: -len(".model")]), vocab_size
    )
    card = dataclasses.replace(card, tokenizer=file_name, tokenizer_vocab_size=Tokenizer(path).vocab_size)
    card.save(shards_dir)
    return path


def run() -> None:
    """Console entry point ``audiodiff-tokenizer``."""
    from absl import app, flags

    # Flags are defined here rather than at import so that importing this library
    # module never adds (or collides with) flags of the program that imports it.
    flags.DEFINE_string("shards_dir", None, "latent shard folder (holds dataset_card.json)", required=True)
    flags.DEFINE_integer("vocab_size", 512, "largest vocabulary (fewer pieces if the captions are few)")
    flags.DEFINE_string("file_name", DEFAULT_FILE, "model file name inside --shards_dir")

    def main(argv):
        del argv
        f = flags.FLAGS
        path = train_for_dataset(f.shards_dir, f.vocab_size, f.file_name)
        print(f"wrote {path} (vocab_size={Tokenizer(path).vocab_size}) and updated the dataset card")

    app.run(main)


if __name__ == "__main__":
    run()
