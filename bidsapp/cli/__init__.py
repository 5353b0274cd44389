"""Command-line interface: parser, run (exit codes), participant/group levels, demo."""
