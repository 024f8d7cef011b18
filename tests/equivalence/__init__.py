"""Re-exports of the product's tests (klparity.suite); a package so their basenames may repeat in tests/unit."""
