"""Test environment for microagent: a local OCI registry and stand-in base images.

Nothing here is part of the shipped package. The modules are plain scripts that can also be
imported (with ``scripts/`` on ``sys.path``), which is how ``tests/integration/conftest.py`` uses
them:

- :mod:`testenv.registry` starts and stops a real ``docker-registry`` on loopback;
- :mod:`testenv.faultproxy` puts a registry that misbehaves on purpose in front of it (5xx,
  resets, stalls, wrong lengths and digests, the 401 token flow, a failing mirror);
- :mod:`testenv.oci` writes deterministic OCI image layouts from a directory tree;
- :mod:`testenv.standin` builds (and caches) the ``python:3.13-slim`` and ``busybox`` stand-ins
  and pushes them with ``skopeo``.
"""
