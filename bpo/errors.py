"""Errors that carry the status a remote caller should see.

Each error names its gRPC status code as a string so that this module needs no gRPC import; the servers
convert them in one interceptor, and the CLI prints their message.
"""

from __future__ import annotations

from typing import ClassVar


class BpoError(Exception):
    status_code: ClassVar[str] = "INTERNAL"


class InvalidPromptError(BpoError):
    """The prompt cannot be optimized as given (empty, or too long for the engine)."""

    status_code = "INVALID_ARGUMENT"


class PromptTooLongError(InvalidPromptError):
    def __init__(self, prompt_tokens: int, context_length: int, reserved_for_output: int) -> None:
        super().__init__(
            f"prompt needs {prompt_tokens} tokens but the engine's context holds {context_length} "
            f"(with at least {reserved_for_output} kept for the rewrite); shorten the instruction or move "
            "long passages into the context field, which is passed through without being rewritten"
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class InvalidConfigurationError(BpoError):
    status_code = "INVALID_ARGUMENT"


class ModelNotFoundError(BpoError):
    status_code = "NOT_FOUND"


class JobNotFoundError(BpoError):
    status_code = "NOT_FOUND"


class ModelIntegrityError(BpoError):
    """Assembled weights do not match their pinned checksum."""

    status_code = "FAILED_PRECONDITION"


class EngineUnavailableError(BpoError):
    """The engine, or the endpoint behind it, cannot serve requests right now."""

    status_code = "UNAVAILABLE"


class EngineOverloadedError(BpoError):
    status_code = "RESOURCE_EXHAUSTED"


class CorpusFormatError(BpoError):
    status_code = "INVALID_ARGUMENT"


class UnauthenticatedError(BpoError):
    """No token, a malformed one, or one that is not (or no longer) valid."""

    status_code = "UNAUTHENTICATED"


class PermissionDeniedError(BpoError):
    """The caller is known but may not do this (a disabled team, an endpoint it may not use)."""

    status_code = "PERMISSION_DENIED"


class QuotaExceededError(BpoError):
    """A team quota is used up; the message names the quota and when it resets."""

    status_code = "RESOURCE_EXHAUSTED"


def error_for_status(status_code: str, message: str) -> BpoError:
    """Rebuild an error from a status code carried across a process boundary (a batch result, a task)."""
    for cls in (
        InvalidPromptError,
        ModelNotFoundError,
        JobNotFoundError,
        ModelIntegrityError,
        EngineUnavailableError,
        EngineOverloadedError,
        UnauthenticatedError,
        PermissionDeniedError,
    ):
        if cls.status_code == status_code:
            return cls(message)
    return BpoError(message)
