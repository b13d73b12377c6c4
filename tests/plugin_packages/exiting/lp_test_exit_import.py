"""Test plugin that calls sys.exit() when imported, as a script-like module might."""

import sys

sys.exit("lp_test_exit_import: no configuration found, giving up")
