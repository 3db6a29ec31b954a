"""Errors: each carries the API's status and message."""

from __future__ import annotations

import json


class AirlockError(Exception):
    """A request failed. `status` is the HTTP status (0: no answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} (HTTP {status})" if status else message)
        self.status = status
        self.message = message


class BadRequest(AirlockError):
    """400: the request named something invalid."""


class Forbidden(AirlockError):
    """403: the caller may not do that."""


class NotFound(AirlockError):
    """404: no such sandbox, file, snapshot or command."""


class Conflict(AirlockError):
    """409: the sandbox or path is not in a state that allows it."""


class NoSpace(AirlockError):
    """507: the disk quota is full."""


_BY_STATUS = {400: BadRequest, 403: Forbidden, 404: NotFound, 409: Conflict, 507: NoSpace}


def error_for(status: int, body: bytes) -> AirlockError:
    """The exception for an error answer."""
    try:
        message = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace").strip() or f"HTTP {status}"
    return _BY_STATUS.get(status, AirlockError)(status, message)
