"""A codec by name (``audiodiff_jax/codec/lookup.py``): shipped key or card name, folder,
``module:factory`` only from the user, and one clear line for a name that opens nothing."""

import json
import os
import shutil

import pytest

from audiodiff_jax.codec import codec as codec_lib
from audiodiff_jax.codec import lookup
from audiodiff_jax.codec.codec import JaxCodec
from audiodiff_jax.core.errors import UserError
from tests.precompute_codec import PoolingCodec

FACTORY = "tests.precompute_codec:make_codec"


def test_shipped_codec_by_key_and_by_card_name():
    by_key = lookup.codec_by_name("default", allow_code=False)
    assert isinstance(by_key, JaxCodec)
    assert by_key.card.name == "audiodiff-vae-small"
    by_card = lookup.codec_by_name(by_key.card.name, allow_code=False)  # what a dataset card records
    assert by_card.card == by_key.card
    assert lookup.codec_by_name("audiodiff-vae-music", allow_code=False).card.name == "audiodiff-vae-music"


def test_exported_codec_folder(tmp_path):
    folder = str(tmp_path / "codec")
    shutil.copytree(codec_lib.SHIPPED["default"], folder)
    card_path = os.path.join(folder, codec_lib.CARD_FILE)
    with open(card_path) as f:
        card = json.load(f)
    card["name"] = card["model"]["name"] = "my-codec"
    with open(card_path, "w") as f:
        json.dump(card, f)
    codec = lookup.codec_by_name(folder, allow_code=False)
    assert isinstance(codec, JaxCodec)
    assert codec.card.name == "my-codec"
    with pytest.raises(lookup.CodecNotFoundError, match="'my-codec'"):  # only shipped codecs by card name
        lookup.codec_by_name("my-codec", allow_code=False)


def test_unknown_name_is_one_line_naming_it():
    with pytest.raises(lookup.CodecNotFoundError) as e:
        lookup.codec_by_name("synthetic-demo", allow_code=False)
    message = str(e.value)
    assert isinstance(e.value, UserError)
    assert "\n" not in message
    assert message.startswith("the dataset card names codec 'synthetic-demo', which is not on this machine")
    assert "--codec=NAME_OR_PATH" in message and "default, music" in message
    assert "module:factory" not in message  # an artifact's name is not offered code
    with pytest.raises(lookup.CodecNotFoundError, match=r"^codec '/no/such/folder' is not on this machine"):
        lookup.codec_by_name("/no/such/folder", allow_code=True, option="--config.eval.codec")
    with pytest.raises(lookup.CodecNotFoundError, match=r"--config\.eval\.codec=NAME_OR_PATH"):
        lookup.codec_by_name("", allow_code=True, option="--config.eval.codec")


def test_factory_from_an_artifact_is_refused_without_importing(monkeypatch):
    def no_import(name):
        raise AssertionError(f"imported {name}")

    monkeypatch.setattr(lookup.importlib, "import_module", no_import)
    with pytest.raises(lookup.CodecNotFoundError) as e:
        lookup.codec_by_name(FACTORY, allow_code=False)
    message = str(e.value)
    assert "\n" not in message
    assert f"names codec {FACTORY!r}" in message
    assert "not imported because the name came from an artifact" in message
    assert f"--codec={FACTORY}" in message


def test_factory_from_the_user_is_imported_and_called():
    codec = lookup.codec_by_name(FACTORY, allow_code=True)
    assert isinstance(codec, PoolingCodec)
    assert codec.card.name == "test-pooling"
    # An attribute that already is a codec object is taken as it is, not called.
    codec = lookup.codec_by_name("tests.test_codec_lookup:A_CODEC", allow_code=True)
    assert isinstance(codec, PoolingCodec) and codec.card.hop == 80


A_CODEC = PoolingCodec(hop=80)  # not callable: calling it would fail


def test_factory_that_cannot_be_imported_or_gives_no_codec():
    with pytest.raises(
        lookup.CodecNotFoundError, match=r"^codec 'no_such_module_x:make' cannot be imported \("
    ):
        lookup.codec_by_name("no_such_module_x:make", allow_code=True)
    with pytest.raises(lookup.CodecNotFoundError, match=r"gives a str \(no card, encode and decode\)"):
        lookup.codec_by_name("tests.test_codec_lookup:FACTORY", allow_code=True)
