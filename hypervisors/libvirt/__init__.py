"""
The libvirt/QEMU driver: :class:`LibvirtDriver`. Its parts: :mod:`.xml` (domain XML, pure),
:mod:`.events` (libvirt's event loop on the reactor, lifecycle events), :mod:`.host` (KVM and
the accelerator), :mod:`.driver` (the driver).
"""

from hypervisors.libvirt.driver import LibvirtDriver

__all__ = ["LibvirtDriver"]
