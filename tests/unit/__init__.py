"""Unit tests (a package, so test modules may share a basename with an integration test)."""
