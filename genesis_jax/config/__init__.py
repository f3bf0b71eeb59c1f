"""The config schema (one section per mode), its validation and config-file loading."""
