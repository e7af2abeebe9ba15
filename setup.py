"""Only the native gate lives here; everything else is in pyproject.toml.

runtime/gate.c is llama.cpp's eval callback in C.  It is optional: without a
C compiler the package installs and the runtime falls back to the Python
callback (slower per token, same results).
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("edge_reft.runtime._gate", ["runtime/gate.c"], optional=True,
                             extra_compile_args=["-O3"])])
