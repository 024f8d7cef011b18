"""Repository-level hooks. Everything else lives in the installed plugin (``klparity.plugin``)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("klparity"):
        raise pytest.UsageError("the klparity plugin is not loaded: install the package, pip install -e '.[all]'")
