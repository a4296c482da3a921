"""
The VMware driver (Workstation Pro, Fusion, Workstation Player) on ``vmrun``.

:class:`VMwareDriver` is registered as the ``vmware`` entry point of
``vmcontroller.hypervisors``; :mod:`hypervisors.vmware.vmx` writes and reads ``.vmx`` files.
"""

from hypervisors.vmware.driver import DEFAULT_STATE_DIR, VMwareDriver

__all__ = ["DEFAULT_STATE_DIR", "VMwareDriver"]
