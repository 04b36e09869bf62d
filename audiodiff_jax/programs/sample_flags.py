"""One flag per field of the config's sample section, for the programs that sample
(``audiodiff-sample``, ``audiodiff-serve``).

Each flag has the field's help text and built-in default (``config.SampleConfig``). A
flag that is not given leaves the field to the config saved with the weights. Flags
keep their historical names where they differ from the field's (``--sampler``).
Values are parsed and checked by the program (not absl), so that a bad one exits 2
naming the flag, before the weights are read.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from audiodiff_jax.core import config as config_lib

_FLAG_NAMES = {"samplers": "sampler"}


def _define_sample_flag(field: dataclasses.Field):
    name = _FLAG_NAMES.get(field.name, field.name)
    default = getattr(config_lib.SampleConfig(), field.name)
    help_text = f"{field.metadata['help']} Not given: sample.{field.name} of the checkpoint's config."
    if config_lib.is_sample_axis(field.name):
        return flags.DEFINE_list(name, [str(v) for v in default], help_text)
    return flags.DEFINE_string(name, str(default), help_text)


SAMPLE_FLAGS = {f.name: _define_sample_flag(f) for f in dataclasses.fields(config_lib.SampleConfig)}


def flag_name(field: str) -> str:
    """``--sampler`` for the field ``samplers``: how errors name a sample field given as a flag."""
    return "--" + _FLAG_NAMES.get(field, field)


def _parse_value(text: str, tp: type, flag: str, shown: str):
    if tp is str:
        return text
    try:
        return tp(text)
    except ValueError:
        raise ValueError(
            f"{flag}={shown}: {text!r} is not {'an' if tp is int else 'a'} {tp.__name__}"
        ) from None


def given() -> dict:
    """The sample fields given as flags, parsed (not yet checked: ``check_sample_values``).

    Raises:
      ValueError: naming the flag and its value.
    """
    out = {}
    for field, holder in SAMPLE_FLAGS.items():
        if not holder.present:
            continue
        flag = flag_name(field)
        if config_lib.is_sample_axis(field):
            tp, shown = config_lib.sample_field_type(field), ",".join(holder.value)
            out[field] = tuple(_parse_value(v, tp, flag, shown) for v in holder.value)
        else:
            out[field] = _parse_value(holder.value, config_lib.sample_field_type(field), flag, holder.value)
    return out
