"""The kit's floor: file I/O and geometry, folder layouts, the stage table, parameters, label names, currency
and stage stamps, process pools and their lifetime, terminal echo, devices, archives."""
