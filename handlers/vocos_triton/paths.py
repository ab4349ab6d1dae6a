"""Default locations, relative to the working directory (``make`` runs from the checkout's root).

The only place that knows the checkout's layout; every command takes its own ``--model-repository``
/ ``--output`` / ``--build-dir`` and these are just their defaults.
"""
from __future__ import annotations

from pathlib import Path

#: the committed configs and ``model.py`` files, where ``make repository`` writes the artifacts
DEFAULT_REPOSITORY = Path("model_repository")
#: generated files: the Python backend folder the launcher assembles, random checkpoints, logs
DEFAULT_BUILD_DIR = Path("build")


def template_repository() -> Path:
    """The checkout's committed ``model_repository/`` (configs + ``model.py``), which the export copies
    into a repository built elsewhere: the working directory's, else the one beside this package's
    source tree (an editable install, as the tests and the bench use it)."""
    here = DEFAULT_REPOSITORY.resolve()
    if any(here.glob("*/config.pbtxt")):
        return here
    return Path(__file__).resolve().parents[2] / DEFAULT_REPOSITORY
