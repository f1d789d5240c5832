"""Models loaded from disk, run directories and judges reached over HTTP."""
