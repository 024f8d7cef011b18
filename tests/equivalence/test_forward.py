"""The product's forward parity test, collected from the installed package (one source of truth)."""

from klparity.suite.test_forward import test_forward  # noqa: F401  (re-exported for collection)
