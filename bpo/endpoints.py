"""The model endpoints an operator declares: the only things a caller can name as optimizer, target or judge.

Callers name an endpoint; everything that reaches an engine (its kind, URL, served model name, API key,
concurrency, rate limit, context length) comes from the operator's declaration, never from the caller. A key is
named by its *secret* (``api_key_secret``), which the services read from ``BPO_SECRET_<NAME>`` or from the file
``<BPO_SECRETS_DIR>/<name>`` (a mounted Kubernetes Secret); neither a caller nor a job ever carries it.

Declarations come from a TOML file (``BPO_ENDPOINTS_FILE``) or the same structure as JSON (``BPO_ENDPOINTS``)::

    [endpoints.gpt-4o-mini]
    engine = "openai"
    url = "https://api.openai.com/v1"
    model = "gpt-4o-mini"            # the name the endpoint serves, sent exactly
    api_key_secret = "openai"
    roles = ["target", "judge"]      # what it may be used as (default: all three)
    teams = ["research"]             # who may use it (default: every team)
    max_concurrency = 16
    requests_per_second = 8
    context_length = 128000
    usd_per_million_input_tokens = 0.15
    usd_per_million_output_tokens = 0.60

    [endpoints.smollm2]
    engine = "llamacpp"              # in-process weights: model is a catalogue name
    model = "smollm2-135m-instruct"

With nothing declared, every packaged catalogue model is an endpoint of its own name on the platform's in-process
engine (``BPO_ENGINE__NAME``), usable by everyone in every role: ``make run`` needs no configuration.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from bpo.errors import BpoError, InvalidConfigurationError
from bpo.models.catalogue import BUILTIN_MODELS, SourceKind
from bpo.settings import BpoSettings, EngineName, EngineSettings

Role = Literal["optimizer", "target", "judge"]
ROLES: tuple[Role, ...] = ("optimizer", "target", "judge")
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class EndpointNotFoundError(BpoError):
    status_code = "NOT_FOUND"


class EndpointForbiddenError(BpoError):
    status_code = "PERMISSION_DENIED"


class EndpointConfig(BaseModel, extra="forbid"):
    """One declared endpoint (``name`` is its key in the declarations)."""

    name: str
    engine: EngineName
    model: str
    url: str | None = None
    api_key_secret: str | None = None
    roles: tuple[Role, ...] = ROLES
    teams: tuple[str, ...] = ("*",)
    max_concurrency: int = Field(default=8, ge=1, le=1024)
    requests_per_second: float = Field(default=0.0, ge=0)
    context_length: int | None = Field(default=None, ge=256)
    prompt_style: Literal["chat_instruction", "bpo_template"] = "chat_instruction"
    extra_body: dict[str, Any] = Field(default_factory=dict)
    usd_per_million_input_tokens: float = Field(default=0.0, ge=0)
    usd_per_million_output_tokens: float = Field(default=0.0, ge=0)

    @field_validator("name", "api_key_secret")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        if value is not None and (not value or len(value) > 128 or not set(value) <= _NAME_CHARS):
            raise ValueError(f"{value!r} must be 1-128 letters, digits, '.', '_' or '-'")
        return value

    @model_validator(mode="after")
    def _openai_needs_a_url(self) -> EndpointConfig:
        if self.engine == "openai" and not self.url:
            raise ValueError(f"endpoint {self.name!r} uses engine openai but declares no url")
        if self.engine != "openai" and (self.url or self.api_key_secret):
            raise ValueError(
                f"endpoint {self.name!r} runs in-process ({self.engine}): url and api_key_secret are for openai"
            )
        return self

    def allows(self, team: str) -> bool:
        return "*" in self.teams or team in self.teams

    def cost_usd(self, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * self.usd_per_million_input_tokens + tokens_out * self.usd_per_million_output_tokens) / 1e6


class Secrets:
    """Named secrets the services read: ``BPO_SECRET_<NAME>`` (upper case, ``-`` and ``.`` as ``_``), else the
    file ``<directory>/<name>``. Names come from the operator's declarations only."""

    def __init__(self, directory: Path | None, environ: Mapping[str, str] | None = None) -> None:
        self._directory = directory
        self._environ = environ if environ is not None else os.environ

    def get(self, name: str) -> str:
        variable = "BPO_SECRET_" + name.upper().replace("-", "_").replace(".", "_")
        if variable in self._environ:
            return self._environ[variable]
        if self._directory is not None:
            path = self._directory / name
            if path.is_file():
                return path.read_text(encoding="utf-8").strip()
        where = self._directory or "<BPO_SECRETS_DIR>"
        raise InvalidConfigurationError(f"secret {name!r} is not set: export {variable} or put it in {where}/{name}")


class Endpoints:
    """The declared endpoints of a deployment, looked up by name for a role and a team."""

    def __init__(self, endpoints: Mapping[str, EndpointConfig], base: EngineSettings, secrets: Secrets) -> None:
        self._endpoints = dict(endpoints)
        self._base = base
        self._secrets = secrets

    @classmethod
    def from_settings(cls, settings: BpoSettings) -> Endpoints:
        declared = load_declarations(settings)
        return cls(declared, settings.engine, Secrets(settings.secrets_dir))

    def __iter__(self) -> Iterator[EndpointConfig]:
        return iter(self._endpoints.values())

    def names(self) -> list[str]:
        return sorted(self._endpoints)

    def get(self, name: str, role: Role | None = None, team: str | None = None) -> EndpointConfig:
        """The endpoint ``name`` for ``role`` as ``team`` may use it; NOT_FOUND, INVALID_ARGUMENT or
        PERMISSION_DENIED with the reason otherwise. A URL or a path is just an unknown name here."""
        endpoint = self._endpoints.get(name)
        if endpoint is None:
            known = ", ".join(self.names()) or "none"
            raise EndpointNotFoundError(f"no endpoint named {name!r} is declared; declared: {known}")
        if role is not None and role not in endpoint.roles:
            raise InvalidConfigurationError(
                f"endpoint {name!r} cannot be used as {role} (its roles: {', '.join(endpoint.roles)})"
            )
        if team is not None and not endpoint.allows(team):
            raise EndpointForbiddenError(f"team {team!r} may not use endpoint {name!r}")
        return endpoint

    def engine_settings(self, endpoint: EndpointConfig) -> EngineSettings:
        """The engine an endpoint runs on, with its secret resolved now (only where the engine is built)."""
        update: dict[str, Any] = {
            "name": endpoint.engine,
            "model": endpoint.model,
            "max_concurrency": endpoint.max_concurrency,
            "requests_per_second": endpoint.requests_per_second,
            "openai_prompt_style": endpoint.prompt_style,
            "openai_model": None,
        }
        if endpoint.context_length is not None:
            update["context_length"] = endpoint.context_length
        if endpoint.engine == "openai":
            update["openai_base_url"] = endpoint.url
            update["openai_extra_body"] = endpoint.extra_body
            update["openai_api_key"] = self._secrets.get(endpoint.api_key_secret) if endpoint.api_key_secret else None
        return EngineSettings.model_validate(self._base.model_dump() | update)


def default_declarations(engine: EngineSettings) -> dict[str, EndpointConfig]:
    """Every packaged catalogue model as an endpoint of its own name, on the platform's in-process engine."""
    name = engine.name if engine.name != "openai" else "llamacpp"
    return {
        spec.name: EndpointConfig(name=spec.name, engine=name, model=spec.name)
        for spec in BUILTIN_MODELS
        if spec.source in (SourceKind.PACKAGED_GGUF, SourceKind.PACKAGED_PARTS)
    }


def load_declarations(settings: BpoSettings) -> dict[str, EndpointConfig]:
    raw: dict[str, Any] | None = None
    if settings.endpoints_file is not None:
        try:
            raw = tomllib.loads(settings.endpoints_file.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidConfigurationError(f"cannot read endpoints from {settings.endpoints_file}: {exc}") from exc
    elif settings.endpoints:
        try:
            raw = json.loads(settings.endpoints)
        except json.JSONDecodeError as exc:
            raise InvalidConfigurationError(f"BPO_ENDPOINTS is not valid JSON: {exc}") from exc
    if raw is None:
        return default_declarations(settings.engine)
    entries = raw.get("endpoints", raw) if isinstance(raw, dict) else None
    if not isinstance(entries, dict):
        raise InvalidConfigurationError("endpoint declarations must be a table of endpoints by name")
    declared: dict[str, EndpointConfig] = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise InvalidConfigurationError(f"endpoint {name!r} must be a table")
        try:
            declared[name] = EndpointConfig.model_validate({**entry, "name": name})
        except ValidationError as exc:
            raise InvalidConfigurationError(f"endpoint {name!r}: {exc.errors()[0]['msg']}") from exc
    return declared
