"""Active learning from the field: samplers on the device and at the cloud (`samplers`)."""
