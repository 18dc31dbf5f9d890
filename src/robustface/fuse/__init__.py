"""Feature fusion: one feature for a set of face images (see :mod:`.base`)."""
