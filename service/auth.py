"""Bearer-token authentication with tenants, as a gRPC server interceptor.

Clients send ``authorization: Bearer <token>`` metadata. The server knows a
map token -> tenant (``[auth.tokens]`` in the config) and, optionally, admin
tokens (``[auth] admin_tokens``) that may read store-wide Stats. Each call
resolves to a :class:`Caller`:

* auth on (tenant tokens configured): no token, or an unknown one ->
  ``UNAUTHENTICATED``; an ``x-kvcodec-tenant`` header naming another tenant ->
  ``PERMISSION_DENIED``; an admin token on anything but Stats ->
  ``PERMISSION_DENIED``; otherwise the call runs in the token's tenant namespace.
* auth off: every call runs in the open namespace (kind 0, see
  :mod:`kvcodec.service.naming`), which no tenant reaches; an
  ``x-kvcodec-tenant`` header is refused (``PERMISSION_DENIED``) rather than
  silently ignored, since the caller would believe itself isolated.
* in both modes an ``x-kvcodec-salt-bin`` header narrows the namespace to
  ``(tenant, salt)``; a bad one -> ``INVALID_ARGUMENT``.

The health service stays open so load balancers can probe without a token.
Tokens are compared by SHA-256 digest lookup, so no token prefix leaks through
timing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from kvcodec.service.errors import AuthError, RequestRejected, ServiceError, TenantDenied
from kvcodec.service.naming import SALT_HEADER, Namespace, salt_from_header

TENANT_HEADER = "x-kvcodec-tenant"
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
ADMIN_METHODS = ("/kvcodec.v1.KVCache/Stats",)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True)
class Caller:
    """Who a call runs as: its namespace, and whether it presented an admin token."""

    namespace: Namespace
    admin: bool = False

    @property
    def tenant(self) -> str:
        """The tenant's name ("" for the open namespace or an admin-only token)."""
        return self.namespace.label


SINGLE_HEADERS = ("authorization", TENANT_HEADER, SALT_HEADER)


def _headers(metadata: Any) -> dict[str, Any]:
    """Metadata as a dict; a header that decides the namespace may appear only once.

    Raises:
        AuthError: two ``authorization`` headers.
        RequestRejected: two tenant or salt headers.
    """
    headers: dict[str, Any] = {}
    for item in metadata or ():
        name = item[0].lower()
        if name in headers and name in SINGLE_HEADERS:
            kind = AuthError if name == "authorization" else RequestRejected
            raise kind(f"{name}: sent more than once; which one applies would be a guess")
        headers[name] = item[1]
    return headers


class TokenAuthenticator:
    """Maps bearer tokens to tenants (and admin tokens to store-wide Stats).

    Args:
        tokens: token -> tenant. Empty = auth off.
        admin_tokens: tokens that may read store-wide Stats.

    Raises:
        ConfigError: an empty, odd or ambiguous tenant name or an unusable token (checked
            here too, so a server built from an unvalidated config refuses them as well).
    """

    def __init__(self, tokens: Mapping[str, str] | None = None,
                 admin_tokens: Iterable[str] = ()) -> None:
        from kvcodec.service.config import check_tokens

        admin_tokens = list(admin_tokens)
        check_tokens(dict(tokens or {}), admin_tokens)
        self._tenants = {_digest(t): tenant for t, tenant in (tokens or {}).items()}
        self._admins = {_digest(t) for t in admin_tokens}

    @property
    def enabled(self) -> bool:
        """Whether tenant tokens are configured (auth on)."""
        return bool(self._tenants)

    @property
    def intercepts(self) -> bool:
        """Whether calls need checking before a handler runs (auth on, or admin tokens)."""
        return bool(self._tenants or self._admins)

    def resolve(self, metadata: Any, method: str = "") -> Caller:
        """The caller of a call, from its invocation metadata.

        Args:
            metadata: the call's metadata (key, value) pairs.
            method: the full method name ("/kvcodec.v1.KVCache/Stats"); admin-only tokens
                are accepted for Stats alone.

        Raises:
            AuthError: auth on and no or an unknown bearer token (UNAUTHENTICATED).
            TenantDenied: a tenant header that is not the caller's, or an admin-only token
                outside Stats (PERMISSION_DENIED).
            RequestRejected: a bad salt header (INVALID_ARGUMENT).
        """
        headers = _headers(metadata)
        salt = salt_from_header(headers.get(SALT_HEADER))
        auth = headers.get("authorization", "")
        scheme, _, token = (auth if isinstance(auth, str) else "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        digest = _digest(token) if token else b""
        admin = digest in self._admins
        asked = headers.get(TENANT_HEADER)
        if not self.enabled:
            if asked is not None:
                raise TenantDenied(f"{TENANT_HEADER}: auth is off on this server, so no call runs "
                                   f"as tenant {str(asked)[:80]!r} (configure [auth.tokens])")
            return Caller(Namespace(None, salt), admin)
        if not token:
            raise AuthError("authorization: missing bearer token")
        tenant = self._tenants.get(digest)
        if tenant is None and not admin:
            raise AuthError("authorization: unknown bearer token")
        if tenant is None and method not in ADMIN_METHODS:
            raise TenantDenied(f"authorization: an admin token may call only Stats, not "
                               f"{method.rsplit('/', 1)[-1] or 'this method'}")
        if asked is not None and asked != tenant:
            raise TenantDenied(f"{TENANT_HEADER}: token is not valid for tenant {str(asked)[:80]!r}")
        return Caller(Namespace(tenant, salt) if tenant is not None else Namespace(None, salt), admin)

    def check(self, metadata: Any, method: str = "") -> tuple[grpc.StatusCode | None, str]:
        """Decide a call from its invocation metadata: ``(None, "")`` when allowed,
        else ``(code, message)``."""
        try:
            self.resolve(metadata, method)
        except ServiceError as exc:
            return status_of(exc), str(exc)
        return None, ""

    def caller_of(self, context: grpc.ServicerContext, method: str) -> Caller:
        """The caller of a call that reached a handler (raises like :meth:`resolve`)."""
        return self.resolve(context.invocation_metadata(), method)


def status_of(exc: ServiceError) -> grpc.StatusCode:
    """The status code of an authentication outcome."""
    if isinstance(exc, TenantDenied):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(exc, AuthError):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(exc, RequestRejected):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def _rejecting_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode,
                       message: str) -> grpc.RpcMethodHandler:
    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class AuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without a valid token before they reach a handler."""

    def __init__(self, authenticator: TokenAuthenticator) -> None:
        self.authenticator = authenticator

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        code, message = self.authenticator.check(handler_call_details.invocation_metadata, method)
        if code is None:
            return handler
        return _rejecting_handler(handler, code, message)
