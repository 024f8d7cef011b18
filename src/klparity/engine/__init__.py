"""The engine: one judge and the runners of every tier (forward, gradient, golden, scale), and the
report, compare, merge, mutate and pinned-facts commands built on them. Names no framework or API."""
