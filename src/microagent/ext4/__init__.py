"""ext4 images with e2fsprogs: mkfs, the debugfs toolkit, overlay views, packed images."""
