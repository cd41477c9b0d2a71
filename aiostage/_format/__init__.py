"""The on-disk format as pure bytes in and out (no I/O): headers and manifest (``codec``), the
structure codec, DTensor placements, and the plan of a data file."""
