"""`make bench`: direct vs Ferry vs Envoy, side by side on one simulated node (see bench.run)."""
