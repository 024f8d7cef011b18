"""The product's golden parity test, collected from the installed package (one source of truth)."""

from klparity.suite.test_goldens import pytest_generate_tests, test_goldens  # noqa: F401  (re-exported for collection)
