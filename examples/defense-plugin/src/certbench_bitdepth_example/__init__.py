"""Example certbench plugin package."""
