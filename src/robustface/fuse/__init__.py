"""Feature fusion: aggregating the features of a set of face images into one."""
