"""The command-line fixtures (a small corpus) for the reliability tests that drive `mambakit`."""
from tests.cli.conftest import corpus  # noqa: F401
