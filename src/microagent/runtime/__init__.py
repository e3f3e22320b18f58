"""runtime stage of microagent (private implementation modules)."""
