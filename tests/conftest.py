"""Shared pytest configuration.

Fixtures for each area live in their own plugin modules beside this file.
"""

from __future__ import annotations

pytest_plugins = ["_store_fixtures", "_model_fixtures", "_service_fixtures"]
