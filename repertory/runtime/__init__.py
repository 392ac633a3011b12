"""The node: CLI, processes, and everything that runs actors."""
