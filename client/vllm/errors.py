"""Errors raised by the vLLM connector.

::

    ConnectorError
    └── ConnectorConfigError   a kv_connector_extra_config field or the engine's
                               configuration cannot be used (names the field and value)

Nothing the store or the cache server does at run time raises out of the
connector: a missing, corrupt, slow or unreachable chunk becomes a miss or a
load error that vLLM recomputes.
"""

from __future__ import annotations

__all__ = ["ConnectorError", "ConnectorConfigError"]


class ConnectorError(Exception):
    """Root of the errors the vLLM connector raises."""


class ConnectorConfigError(ConnectorError, ValueError):
    """A configuration field cannot be used; the message names the field and the value."""
