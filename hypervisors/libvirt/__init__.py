"""
The libvirt/QEMU driver: :class:`LibvirtDriver`. Its parts: :mod:`.xml` (domain XML, pure),
:mod:`.events` (libvirt's event loop on the reactor, lifecycle events), :mod:`.host` (KVM and
the accelerator), :mod:`.channel` (a guest channel through libvirt, for remote URIs),
:mod:`.storage` (images as storage volumes, for remote URIs), :mod:`.driver` (the driver).
"""

from hypervisors.libvirt.driver import LibvirtDriver

__all__ = ["LibvirtDriver"]
