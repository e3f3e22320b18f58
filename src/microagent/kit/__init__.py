"""The guest kit: kernel and initramfs built from Debian packages, and the init templates."""
