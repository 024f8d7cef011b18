"""The product's gradient parity test, collected from the installed package (one source of truth)."""

from klparity.suite.test_gradients import test_gradients  # noqa: F401  (re-exported for collection)
