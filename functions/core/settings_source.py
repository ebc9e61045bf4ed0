"""How `functions.core.settings.Settings` reads a mapping of variables and words its errors.

Kept apart from the model so the model's file holds the fields: `Variables` is pydantic-settings'
environment source over a given mapping (not `os.environ`), with one rule of ours: a blank value
keeps the default unless the field says blank means "none". `settings_error` turns pydantic's
ValidationError into one `SettingsError` naming each variable (`DOCKYARD_X='value': why`).
"""

from __future__ import annotations

from typing import Callable, Mapping

from pydantic import ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource
from pydantic_settings.sources.utils import parse_env_vars

from functions.errors import SettingsError


class Variables(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping, with our rule for blank values."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]):
        self._mapping = env
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._mapping, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)

    def get_field_value(self, field, field_name: str):
        value, key, is_complex = super().get_field_value(field, field_name)
        if isinstance(value, str):
            value = value.strip()
            if not value and not field.json_schema_extra["blank"]:
                value = None  # blank keeps the default
        return value, key, is_complex


def settings_error(cls, exc: ValidationError, mask_url: Callable[[str], str]) -> SettingsError:
    """Every problem as `DOCKYARD_X='value': why` (URL passwords masked); `field` is the first variable at fault."""
    by_key = {**{name: name for name in cls.model_fields}, **{cls.variable(n): n for n in cls.model_fields}}
    messages, first = [], None
    for error in exc.errors():
        why = error["msg"].removeprefix("Value error, ")
        name = by_key.get(str(error["loc"][0])) if error["loc"] else None
        if name is None:
            messages.append(f"{'.'.join(map(str, error['loc']))}: {why}" if error["loc"] else why)
            continue
        value = error.get("input")
        if isinstance(value, str) and cls.model_fields[name].json_schema_extra["url"]:
            value = mask_url(value)
        messages.append(f"{cls.variable(name)}={value!r}: {why}")
        first = first or cls.variable(name)
    return SettingsError("; ".join(messages), first)
