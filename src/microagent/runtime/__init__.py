"""The runtime: VM backends, networking, the guest channels, config disks, the supervisor."""
