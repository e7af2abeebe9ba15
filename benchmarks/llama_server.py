"""llama.cpp's own llama-server, built CPU-only from the pinned llama-cpp-python sdist: the
anchor that serving benchmarks compare `edge-reft serve` against.

    python benchmarks/llama_server.py build                  # prints the binary's path
    python benchmarks/llama_server.py serve MODEL.gguf --np 8 --port P

From the sdist's vendor/llama.cpp: the server embeds a web UI the sdist lacks and cmake would
fetch from Hugging Face (scripts/ui-assets.cmake), so LLAMA_USE_PREBUILT_UI is off (an empty
UI); libraries are static so the binary survives its move into the cache; no GPU backend is
configured.  With an explicit -np the server keeps one KV stream per slot (kv_unified false,
common/common.h:575; only -np auto turns it on, tools/server/server.cpp:156), sparing each
slot attention over the other slots' cells.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

from edge_reft.errors import BackendError
from edge_reft.files import atomic_dir, lock_file, locked
from edge_reft.models import cache_dir

VERSION = "0.3.36"  # pinned llama-cpp-python; its vendor/llama.cpp is what edge-reft runs
CMAKE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON",
                 "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF",
                 "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF"]


def _machine_key() -> str:
    """The pinned version, the architecture and a hash of the CPU's flags (GGML_NATIVE builds
    for this CPU only) and of the options, so a cache from another machine is never reused."""
    flags = platform.processor()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next((ln.split(":", 1)[1] for ln in lines if ln.split(":")[0].strip() in ("flags", "Features")), flags)
    digest = hashlib.sha256(" ".join(sorted(flags.split()) + CMAKE_OPTIONS).encode()).hexdigest()[:12]
    return f"{VERSION}-{platform.machine()}-{digest}"


def _run(cmd: Sequence[str], log: Path, what: str) -> None:
    with open(log, "ab") as f:
        rc = subprocess.run(list(cmd), stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise BackendError(f"llama-server build: {what} failed (exit {rc}), expected exit 0; log tail:\n{tail}")


PREBUILT = "EDGE_REFT_LLAMA_SERVER"  # a llama-server built elsewhere from the same sources (a GPU build)


def build() -> Path:
    """The llama-server binary for this machine, built once into the cache (a few minutes), or
    $EDGE_REFT_LLAMA_SERVER: one built from the same pinned sources with a GPU backend
    (benchmarks/gpu/serve.sh builds it with CUDA beside the libraries edge-reft then loads)."""
    if os.environ.get(PREBUILT):
        binary = Path(os.environ[PREBUILT])
        if not binary.is_file():
            raise BackendError(f"${PREBUILT}: {binary} is not a file, expected a llama-server binary")
        return binary
    target = cache_dir() / "llama-server" / _machine_key()
    binary = target / "llama-server"
    if binary.is_file():
        return binary
    missing = [t for t in ("cmake", (os.environ.get("CXX") or "c++").split()[0]) if not shutil.which(t)]
    if missing:
        raise BackendError(f"llama-server build: {', '.join(missing)} not found on PATH, expected cmake and a C++ compiler")
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(lock_file(target)):
        if binary.is_file():  # built by another process while we waited
            return binary
        with atomic_dir(target) as tmp:
            log = tmp / "build.log"
            _run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-deps",
                  "--no-binary", ":all:", "-d", str(tmp / "sdist")], log, "pip download of the sdist")
            sdists = list((tmp / "sdist").glob("llama_cpp_python-*.tar.gz"))
            if len(sdists) != 1:
                raise BackendError(f"llama-server build: {tmp / 'sdist'}: expected one llama_cpp_python sdist, found {sdists}")
            with tarfile.open(sdists[0]) as tar:
                tar.extractall(tmp / "src", filter="data")
            src = next((tmp / "src").glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
            gen = ["-G", "Ninja"] if shutil.which("ninja") else []
            _run(["cmake", "-S", str(src), "-B", str(tmp / "build"), *gen, *CMAKE_OPTIONS], log, "cmake configure")
            _run(["cmake", "--build", str(tmp / "build"), "--target", "llama-server", "-j", str(os.cpu_count() or 1)],
                 log, "cmake --build --target llama-server")
            shutil.copy2(tmp / "build" / "bin" / "llama-server", tmp / "llama-server")
            for scratch in ("sdist", "src", "build"):
                shutil.rmtree(tmp / scratch)
    return binary


def flags(n_parallel: int, ctx_per_slot: int = 2048, threads: int | None = None,
          repack: bool | None = None, extra: Sequence[str] = ()) -> list[str]:
    """llama-server's flags for ``n_parallel`` slots, continuous batching, a KV stream of
    ``ctx_per_slot`` tokens per slot, greedy by default.  ``repack`` (its --repack/--no-repack,
    CPU weight repacking into llama.cpp's extra buffer types): None takes edge-reft's engine's
    choice on this machine (runtime/llamacpp/repack.py: off where AMX is offered, whose path
    crashes in the pinned build); a fair comparison uses the same choice as the engine."""
    if repack is None:
        from edge_reft.runtime.llamacpp.repack import choose_repack
        repack = choose_repack()[0]
    return ["-np", str(n_parallel), "-cb", "--no-kv-unified", "-c", str(n_parallel * ctx_per_slot),
            "-t", str(threads or os.cpu_count() or 1), "--repack" if repack else "--no-repack",
            "--temp", "0", "--no-webui", *extra]


def note(*args, **kwargs) -> str:
    """The flags as one string, for a benchmark table's header (same arguments as ``flags``)."""
    kind = f"${PREBUILT}" if os.environ.get(PREBUILT) else "CPU"
    return f"llama-server {VERSION} ({kind}) " + " ".join(flags(*args, **kwargs))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start(model: str | os.PathLike[str], n_parallel: int, port: int | None = None, ctx_per_slot: int = 2048,
          threads: int | None = None, repack: bool | None = None, extra: Sequence[str] = (),
          timeout: float = 120.0) -> Iterator[str]:
    """Run llama-server on 127.0.0.1 and yield its base URL once GET /health answers 200;
    its whole process group is killed when the block ends."""
    import httpx
    port = port or free_port()
    cmd = [str(build()), "-m", os.fspath(model), "--host", "127.0.0.1", "--port", str(port),
           *flags(n_parallel, ctx_per_slot, threads, repack, extra)]
    url = f"http://127.0.0.1:{port}"
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                err.seek(0)
                tail = "\n".join(err.read().decode(errors="replace").splitlines()[-20:])
                state = f"exited with {proc.returncode}" if proc.poll() is not None else f"not healthy after {timeout:.0f} s"
                raise BackendError(f"llama-server {state}, expected GET {url}/health to answer 200; stderr tail:\n{tail}")
            time.sleep(0.25)
        yield url
    finally:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
                break
        err.close()


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    sub.add_parser("build", help="build (or find in the cache) llama-server; print its path")
    sp = sub.add_parser("serve", help="run llama-server in the foreground")
    sp.add_argument("model")
    sp.add_argument("--np", type=int, default=8, help="parallel slots (default 8)")
    sp.add_argument("--port", type=int, default=None, help="default: a free one")
    sp.add_argument("--ctx-per-slot", type=int, default=2048)
    sp.add_argument("--threads", type=int, default=None, help="default: every core")
    sp.add_argument("--repack", choices=("on", "off"), default=None, help="default: edge-reft's engine's choice")
    a = ap.parse_args(argv)
    binary = build()
    if a.verb == "build":
        print(binary)
        return
    port = a.port or free_port()
    opts = (a.np, a.ctx_per_slot, a.threads, None if a.repack is None else a.repack == "on")
    print(f"http://127.0.0.1:{port}  {note(*opts)}", file=sys.stderr, flush=True)
    os.execv(binary, [str(binary), "-m", a.model, "--host", "127.0.0.1", "--port", str(port), *flags(*opts)])


if __name__ == "__main__":
    main()
