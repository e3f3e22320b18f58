"""The compiler: spec loading and validation, image references, locks, build plans (pure)."""
