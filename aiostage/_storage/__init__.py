"""Persistence behind the storage seam (``backend``): its local backend, the writer, the reader,
``save``, commit and resharding on load."""
