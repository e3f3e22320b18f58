"""CLI command modules; each exposes COMMANDS for cli.py to register."""
