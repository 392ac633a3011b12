"""The programming model and the built-in actors."""
