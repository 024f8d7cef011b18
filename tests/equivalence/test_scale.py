"""The product's scale-tier test, collected from the installed package (one source of truth)."""

from klparity.suite.test_scale import test_scale  # noqa: F401  (re-exported for collection)
