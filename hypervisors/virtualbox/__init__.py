"""
The VirtualBox driver (:class:`VirtualBoxDriver`), registered as ``virtualbox`` in the
``vmcontroller.hypervisors`` entry points. Its backends (pyvbox, VBoxManage) are private.
"""

from hypervisors.virtualbox.driver import BACKEND_ENV, VirtualBoxDriver

__all__ = ["BACKEND_ENV", "VirtualBoxDriver"]
