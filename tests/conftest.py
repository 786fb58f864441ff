"""Shared test set-up: the repository root and tests/ on sys.path (so tests import rmd's modules and
fault_server by name), and the fixtures more than one test file uses."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)
