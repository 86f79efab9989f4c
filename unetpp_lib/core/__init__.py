"""The kit's floor: file I/O and geometry, folder layouts, parameters, currency and stage stamps, processes, devices, archives."""
