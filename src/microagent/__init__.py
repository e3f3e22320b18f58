"""microagent: AI-agent workspaces in Linux microVMs from one declarative file."""

__version__ = "0.1.0"
