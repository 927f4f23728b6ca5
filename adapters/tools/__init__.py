"""Command-line tools that write adapter checkpoints."""
