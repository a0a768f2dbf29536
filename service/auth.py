"""Bearer-token authentication with tenants, as a gRPC server interceptor.

Clients send ``authorization: Bearer <token>`` metadata. The server knows a
map token -> tenant (``[auth.tokens]`` in the config). With auth on:

* no token, or an unknown one -> ``UNAUTHENTICATED``;
* an ``x-kvcodec-tenant`` header naming another tenant -> ``PERMISSION_DENIED``;
* otherwise the call runs in the token's tenant namespace (every key is mapped
  into it, see :mod:`kvcodec.service.naming`).

The health service stays open so load balancers can probe without a token.
Tokens are compared by SHA-256 digest lookup, so no token prefix leaks through
timing. With auth off every call runs in the empty tenant ``""``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import grpc

TENANT_HEADER = "x-kvcodec-tenant"
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenAuthenticator:
    """Maps bearer tokens to tenants.

    Args:
        tokens: token -> tenant. Empty = auth off.
    """

    def __init__(self, tokens: Mapping[str, str] | None = None) -> None:
        self._tenants = {_digest(t): tenant for t, tenant in (tokens or {}).items()}

    @property
    def enabled(self) -> bool:
        return bool(self._tenants)

    def check(self, metadata: Any) -> tuple[grpc.StatusCode | None, str, str]:
        """Decide a call from its invocation metadata.

        Returns:
            ``(None, tenant, "")`` when allowed, else ``(code, "", message)``.
        """
        headers: dict[str, str] = {}
        for item in metadata or ():
            headers[item[0].lower()] = item[1] if isinstance(item[1], str) else ""
        if not self.enabled:
            return None, "", ""
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return grpc.StatusCode.UNAUTHENTICATED, "", "authorization: missing bearer token"
        tenant = self._tenants.get(_digest(token.strip()))
        if tenant is None:
            return grpc.StatusCode.UNAUTHENTICATED, "", "authorization: unknown bearer token"
        asked = headers.get(TENANT_HEADER)
        if asked is not None and asked != tenant:
            return (grpc.StatusCode.PERMISSION_DENIED, "",
                    f"{TENANT_HEADER}: token is not valid for tenant {asked!r}")
        return None, tenant, ""

    def tenant_of(self, context: grpc.ServicerContext) -> str:
        """The tenant of a call that the interceptor already let through."""
        code, tenant, _ = self.check(context.invocation_metadata())
        return "" if code is not None else tenant


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
        if handler is None or handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        code, _, message = self.authenticator.check(handler_call_details.invocation_metadata)
        if code is None:
            return handler
        return _rejecting_handler(handler, code, message)
