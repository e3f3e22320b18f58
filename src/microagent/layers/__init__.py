"""Layer tarballs: applying them safely into a stage, writing them deterministically."""
