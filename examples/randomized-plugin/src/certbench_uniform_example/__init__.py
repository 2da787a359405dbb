"""Example randomized certbench plugin: uniform noise and a defense that smooths with it."""
