from weights_convert import nvlabs  # noqa: F401  (registers the NVlabs/mmseg checkpoint format)
