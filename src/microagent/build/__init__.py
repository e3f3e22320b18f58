"""Building a plan's root filesystem: base images, setup steps, the shared pipeline."""
