"""The test suite, a package so that its shared modules import as ``tests.<module>``."""
