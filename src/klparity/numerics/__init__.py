"""The numerics: the exact float64 oracle, dtypes, cases, the generic error model, goldens and exact
gradients. Knows no framework: a framework's own error-model rows are its adapter's."""
