"""compiler stage of microagent (private implementation modules)."""
