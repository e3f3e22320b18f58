"""Integration tests use the registry and stand-in fixtures of ``testenv.pytest_plugin``
(loaded by the root conftest)."""
