"""Example: a network of your own, benchmarked by certbench."""
