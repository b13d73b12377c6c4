"""Test plugin that cannot be imported."""

raise ImportError("lp_test_broken_import needs the package 'unobtainium', which is not installed")
