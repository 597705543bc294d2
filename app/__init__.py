"""perceiver-serve: the HTTP service in front of perceiver_core."""
