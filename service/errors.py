"""Errors raised by the cache server and its client.

Library errors of the codec and the store are mapped to gRPC status codes at
the RPC boundary (:func:`kvcodec.service.server.status_for`); the client maps
gRPC errors back to these::

    ServiceError
    ├── ConfigError         a flag, environment variable or config-file value is unusable
    ├── AuthError           missing/unknown bearer token (UNAUTHENTICATED)
    │   └── TenantDenied    the token's tenant is not the one requested (PERMISSION_DENIED)
    ├── RequestRejected     the server refused the request (INVALID_ARGUMENT, NOT_FOUND)
    ├── Overloaded          RESOURCE_EXHAUSTED: oversize message or chunk, too many calls, store full
    ├── DeadlineExceeded    the call's deadline passed
    └── ServerUnavailable   UNAVAILABLE after the client's retries (server down, store down)

Messages name the field and the value (``chunk 3: key 3fa1… does not match
its content (expected 9c1e…)``).
"""

from __future__ import annotations

__all__ = [
    "ServiceError",
    "ConfigError",
    "AuthError",
    "TenantDenied",
    "RequestRejected",
    "Overloaded",
    "DeadlineExceeded",
    "ServerUnavailable",
]


class ServiceError(Exception):
    """Root of every error the service and its client raise."""


class ConfigError(ServiceError, ValueError):
    """A configuration value (flag, environment variable, TOML key) is unusable."""


class AuthError(ServiceError):
    """No valid bearer token was presented."""


class TenantDenied(AuthError):
    """The token is valid but its tenant may not act on the requested tenant."""


class RequestRejected(ServiceError):
    """The server refused the request as malformed or inconsistent."""


class Overloaded(ServiceError):
    """The server refused the request for lack of resources (size, concurrency, space)."""


class DeadlineExceeded(ServiceError):
    """The call's deadline passed before it completed."""


class ServerUnavailable(ServiceError):
    """The server (or its store) could not be reached, retries included."""
