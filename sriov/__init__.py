"""SR-IOV: VF inventory from sysfs and udev, node VF pools, kubelet device plugin (to come)."""
