"""Command-line flags derived from the settings objects, so a flag can never drift from its setting.

Every field of a settings class becomes `--field-name` (a nested model's fields become
`--model-field`, e.g. `--compression-retain-ratio`), with the field's type, choices and
description. A flag left out stays None and leaves the value to the environment or the default.
`videollm serve` takes the flags of all three services at once (`serve_flags`): a name that
several services own (`--model`, `--max-concurrent`) sets it in each of them.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from videollm.settings import EncoderSettings, GatewaySettings, LLMSettings, split_list


@dataclass(frozen=True)
class Flag:
    path: tuple[str, ...]  # the field, e.g. ("compression", "retain_ratio")
    fields: tuple[FieldInfo, ...]  # the field in each owner's settings (one for a single service)
    owners: tuple[str, ...] = ()  # for `serve`: the services that own the setting

    @property
    def field(self) -> FieldInfo:
        return self.fields[0]

    @property
    def dest(self) -> str:
        return "__".join(self.path)

    @property
    def option(self) -> str:
        return "--" + "-".join(self.path).replace("_", "-")


def _bare(annotation):
    """`X | None` -> X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def is_settings_object(annotation) -> bool:
    """A nested settings model (its fields become flags and variables of their own), `X | None` too."""
    annotation = _bare(annotation)
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def flags_of(settings_cls: type[BaseModel], exclude: frozenset[str] = frozenset(),
             prefix: tuple[str, ...] = ()) -> list[Flag]:
    flags = []
    for name, field in settings_cls.model_fields.items():
        if name in exclude:
            continue
        if is_settings_object(field.annotation):
            flags += flags_of(_bare(field.annotation), prefix=(*prefix, name))
        else:
            flags.append(Flag((*prefix, name), (field,)))
    return flags


def _default_text(flag: Flag) -> str:
    """' (default: 8)', or each owner's default where they differ: ' (default: encoder 8, llm 64)'."""
    shown = [",".join(map(str, f.default)) if isinstance(f.default, list) else str(f.default) for f in flag.fields
             if f.default is not PydanticUndefined and f.repr]  # repr=False: a secret
    if not shown:
        return ""
    if len(set(shown)) == 1:
        return f" (default: {shown[0]})"
    return f" (default: {', '.join(f'{owner} {value}' for owner, value in zip(flag.owners, shown))})"


def add_flags(parser: argparse.ArgumentParser, flags: list[Flag]) -> None:
    for flag in flags:
        annotation = _bare(flag.field.annotation)
        help_text = flag.field.description or ""
        if flag.owners:
            help_text += f" [{', '.join(flag.owners)}]"
        help_text += _default_text(flag)
        kwargs: dict = {"dest": flag.dest, "default": None, "help": help_text.strip() or None}
        origin = typing.get_origin(annotation)
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            kwargs["choices"] = list(typing.get_args(annotation))
        elif origin is list:
            kwargs["type"] = split_list
            kwargs["metavar"] = "A,B,..."
        elif origin is dict:
            kwargs["type"] = json.loads
            kwargs["metavar"] = "JSON"
        elif annotation in (int, float, str, Path):
            kwargs["type"] = annotation
        else:
            raise TypeError(f"no flag type for setting {flag.dest} of type {annotation}: add it to add_flags")
        parser.add_argument(flag.option, **kwargs)


def given_values(args: argparse.Namespace, flags: list[Flag], owner: str | None = None) -> dict:
    """The flags the user passed, as nested keyword arguments of the settings class
    (only those `owner` owns when given)."""
    values: dict = {}
    for flag in flags:
        value = getattr(args, flag.dest, None)
        if value is None or (owner is not None and owner not in flag.owners):
            continue
        target = values
        for part in flag.path[:-1]:
            target = target.setdefault(part, {})
        target[flag.path[-1]] = value
    return values


# -- the flags of each command --------------------------------------------------------------------

SERVICES: dict[str, type] = {"gateway": GatewaySettings, "encoder": EncoderSettings, "llm": LLMSettings}

# What `serve` decides itself: the services' addresses and metrics ports (free loopback ports) and
# TLS between them.
SERVE_OWNS = {
    "gateway": frozenset({"encoders", "llms", "grpc_tls_ca", "grpc_tls_cert", "grpc_tls_key"}),
    "encoder": frozenset({"host", "port", "metrics_port", "tls_cert", "tls_key", "tls_client_ca"}),
    "llm": frozenset({"host", "port", "metrics_port", "tls_cert", "tls_key", "tls_client_ca"}),
}


def service_flags(service: str) -> list[Flag]:
    return flags_of(SERVICES[service])


def serve_flags() -> list[Flag]:
    """One flag per setting name across the three services, owned by every service that has it."""
    merged: dict[tuple[str, ...], Flag] = {}
    for service, settings_cls in SERVICES.items():
        for flag in flags_of(settings_cls, exclude=SERVE_OWNS[service]):
            known = merged.get(flag.path)
            merged[flag.path] = Flag(flag.path, (*(known.fields if known else ()), flag.field),
                                     (*(known.owners if known else ()), service))
    return list(merged.values())
