"""The kernel VM tier: `runner` boots Debian's stock kernel in a throw-away QEMU VM."""
