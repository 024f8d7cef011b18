"""The product's pinned-facts tests, collected from the installed package (one source of truth)."""

from klparity.suite.test_pinned import (  # noqa: F401  (re-exported for collection)
    pytest_generate_tests,
    test_pinned_fact,
)
