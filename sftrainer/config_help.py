"""The keys ``sftrainer train --help`` lists: every key a YAML file or a ``key=value`` override takes,
with its help text. SFT keys first, then the ``transformers.TrainingArguments`` ones in groups
(``constants.TRAINING_ARGUMENT_GROUPS``), then the ``model:``, ``data:`` and ``lora:`` sections."""

from __future__ import annotations

import dataclasses
import fnmatch

from sftrainer.constants import TRAINING_ARGUMENT_GROUPS


def keys_help() -> str:
    from sftrainer.config import SFTConfig
    from sftrainer.run_config import SECTIONS

    fields = [f for f in dataclasses.fields(SFTConfig) if f.init and not f.name.startswith("_")]
    sft = [f for f in fields if f.name in SFTConfig.__annotations__]
    lines = ["SFT keys (sftrainer's own, and the TrainingArguments keys it sets otherwise):"]
    lines += [_line(f.name, f) for f in sft]
    for group, names in group_training_arguments([f for f in fields if f not in sft]):
        lines.append(f"TrainingArguments keys: {group}")
        lines += [_line(f.name, f) for f in names]
    for section, cls in SECTIONS.items():
        lines.append(f"{section}: keys")
        lines += [_line(f"{section}.{f.name}", f) for f in dataclasses.fields(cls)]
    return "\n".join(lines)


def group_training_arguments(
    fields: list[dataclasses.Field],
) -> list[tuple[str, list[dataclasses.Field]]]:
    """``fields`` in ``TRAINING_ARGUMENT_GROUPS`` order, each under the first group it matches; the
    ones no group matches under "other". Empty groups are left out."""
    groups: dict[str, list[dataclasses.Field]] = {name: [] for name, _ in TRAINING_ARGUMENT_GROUPS}
    groups["other"] = []
    for f in fields:
        group = next(
            (
                name
                for name, patterns in TRAINING_ARGUMENT_GROUPS
                if any(fnmatch.fnmatchcase(f.name, p) for p in patterns)
            ),
            "other",
        )
        groups[group].append(f)
    return [(name, members) for name, members in groups.items() if members]


def _line(key: str, f: dataclasses.Field) -> str:
    return f"  {key}: {' '.join(str(f.metadata.get('help', '')).split())}"
