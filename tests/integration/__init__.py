"""Integration tests (a package, so test modules may share a basename with a unit test)."""
