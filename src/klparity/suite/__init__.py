"""The product's tests, shipped inside the package so ``pytest --pyargs klparity`` runs them."""
