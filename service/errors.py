"""Typed API errors rendered as ``{"error": {"code", "message"}}`` (docs/api.md, "Errors")."""

from __future__ import annotations


class ApiError(Exception):
    """An error the caller can act on, with its HTTP status and a stable machine-readable code."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers  # e.g. the WWW-Authenticate challenge of a 401

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


def bad_request(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(400, code, message)


def unsupported_media(message: str) -> ApiError:
    return ApiError(415, "unsupported_media_type", message)


def too_large(message: str) -> ApiError:
    return ApiError(413, "payload_too_large", message)


def not_ready(message: str) -> ApiError:
    return ApiError(503, "backend_unavailable", message)
