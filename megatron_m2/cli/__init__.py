"""Command-line entry points (argument parsing lives here, not in the library)."""
