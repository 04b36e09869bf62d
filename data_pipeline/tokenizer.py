"""Caption tokenizer training: a sentencepiece model with the project's fixed ids.

The tokenizer itself (ids, fixed-length encoding) is ``audiodiff_jax/data/tokenizer.py``.

Console script (trains on a dataset's captions and records the model in its card)::

    audiodiff-tokenizer --shards_dir=/data/latents --vocab_size=512
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterable

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_model

from audiodiff_jax.core import paths
from audiodiff_jax.data.cards import DatasetCard
from audiodiff_jax.data.records import read_captions
from audiodiff_jax.data.tokenizer import BOS_ID, DEFAULT_FILE, EOS_ID, PAD_ID, UNK_ID, Tokenizer
from audiodiff_jax.programs import cli

_SEED = 0  # sentencepiece's sampling seed: training is a function of the captions alone


def train_tokenizer(captions: Iterable[str], out_path_prefix: str, vocab_size: int) -> str:
    """Trains a BPE sentencepiece model on captions.

    BPE, not unigram: on caption sets with few distinct words (rendered corpora whose
    captions are spelled from a handful of labels) sentencepiece's unigram trainer
    prunes to single characters (51 pieces for the demo corpus' 375 captions), and a
    caption then takes 35 tokens, more than ``model.text.max_len``; BPE keeps whole
    words (10 tokens for "electric piano and drums in Ab major at 114 bpm").

    ``vocab_size`` is an upper bound, not a promise: training uses
    ``hard_vocab_limit=False``, so a caption set too small to support that many
    pieces yields a smaller vocabulary instead of failing (read the real size from
    :attr:`Tokenizer.vocab_size`). It must still exceed the number of distinct
    characters in the captions plus the 4 special ids. The model bytes are a function
    of the captions and ``vocab_size`` alone (not of the output path or the run).

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
    remote = paths.is_remote(out_path_prefix)  # gs://: trained in a local folder, then uploaded
    out_dir = None if remote else os.path.dirname(os.path.abspath(out_path_prefix))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    # Identical captions must give identical bytes: sentencepiece samples and shuffles
    # with its own generator (seeded here), and writes the model_prefix it was given
    # into the model's trainer_spec. Training goes to a temporary folder and that
    # field is cleared, so the model never records where it was written.
    spm.set_random_generator_seed(_SEED)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tokenizer-") as tmp:
        prefix = os.path.join(tmp, "tokenizer")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(captions),
            model_prefix=prefix,
            vocab_size=vocab_size,
            model_type="bpe",
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
        proto = sp_model.ModelProto()
        with open(prefix + ".model", "rb") as f:
            proto.ParseFromString(f.read())
        proto.trainer_spec.ClearField("model_prefix")
        proto.trainer_spec.ClearField("input")
        paths.atomic_write(out_path_prefix + ".model", proto.SerializeToString(deterministic=True))
        with open(prefix + ".vocab", "rb") as f:
            paths.atomic_write(out_path_prefix + ".vocab", f.read())
    return out_path_prefix + ".model"


def train_for_dataset(shards_dir: str, vocab_size: int, file_name: str = DEFAULT_FILE) -> str:
    """Trains on a dataset's captions and records the model in its dataset card.

    Returns:
      Path of the tokenizer model (inside ``shards_dir``).
    """
    if not file_name.endswith(".model") or os.path.basename(file_name) != file_name:
        raise ValueError(f"file_name={file_name!r} must be a plain '*.model' file name")
    card = DatasetCard.load(shards_dir)
    captions = read_captions(shards_dir)
    path = train_tokenizer(captions, os.path.join(shards_dir, file_name[: -len(".model")]), vocab_size)
    tok = Tokenizer(path)
    card = dataclasses.replace(
        card,
        tokenizer=file_name,
        tokenizer_vocab_size=tok.vocab_size,
        metadata={**card.metadata, **caption_token_stats(captions, tok)},
    )
    card.save(shards_dir)
    return path


def caption_token_stats(captions: Iterable[str], tok: Tokenizer) -> dict[str, int]:
    """``caption_tokens_max``: the longest caption in tokens, EOS included (the card
    records it; training warns when ``model.text.max_len`` would cut captions)."""
    lengths = [tok.length(c) for c in captions]
    return {"caption_tokens_max": max(lengths, default=1)}


def run() -> None:
    """Console entry point ``audiodiff-tokenizer``."""
    from absl import flags

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

    cli.run(main, module=__name__)


if __name__ == "__main__":
    run()
