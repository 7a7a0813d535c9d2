"""GPU and host telemetry: one backend per vendor behind ``GpuBackend``, and the poller.

Importing this package imports no vendor library (pynvml, amdsmi): they load
inside the functions that need them. Entry points:

- ``kaio.devices.detect.detect``: the backends present on this host.
- ``kaio.devices.poller.Poller``: the drift-free sampling thread.
- ``kaio.devices.host.HostBackend``: CPU and RAM, labelled as the host.
- ``kaio.devices.inventory.inventory`` / ``render_inventory``: ``kaio gpus``.
- ``kaio.devices.visible.mark_visible``: which GPUs the run can see.
"""
