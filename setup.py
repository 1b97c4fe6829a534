"""Build script. The pure-Python package needs nothing compiled; see csrc/README.md for the kernels."""
from setuptools import setup

setup()
