"""Boot Debian's 6.1 cloud kernel under QEMU and load (patched) modules: see harness.py."""
