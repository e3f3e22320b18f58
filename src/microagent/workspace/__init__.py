"""Workspaces: records, lifecycle, create, one-shot runs, host checks."""
