"""Only the native gate lives here; everything else is in pyproject.toml.

runtime/llamacpp/gate.c is llama.cpp's eval callback in C (portable C99: gcc, clang,
MSVC).  It is optional: without a working C compiler the package still
installs, says so in one line, and the runtime falls back to the Python
callback (slower per token, same results).
"""
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# optimization flags in each compiler family's own spelling
FLAGS = {"msvc": ["/O2"], "unix": ["-O3", "-fvisibility=hidden"], "mingw32": ["-O3"]}


class GateBuild(build_ext):
    def build_extension(self, ext):
        ext.extra_compile_args = FLAGS.get(self.compiler.compiler_type, [])
        try:
            super().build_extension(ext)
        except Exception as e:  # no compiler, no Python headers, a compiler error
            print(f"edge-reft: the native gate was not built ({type(e).__name__}: {e}); the runtime "
                  "will use the Python gate (same results, slower per token)", file=sys.stderr)


setup(ext_modules=[Extension("edge_reft.runtime.llamacpp._gate", ["runtime/llamacpp/gate.c"], optional=True)],
      cmdclass={"build_ext": GateBuild})
