"""The test suite: a package, so that ``from tests.helpers import ...`` finds this folder first on any sys.path."""
