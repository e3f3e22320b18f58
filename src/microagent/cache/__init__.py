"""cache stage of microagent (private implementation modules)."""
