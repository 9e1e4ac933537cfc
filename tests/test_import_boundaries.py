"""progan/ is plain PyTorch: importing all of it pulls in neither Ray nor MLflow."""

import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_progan_imports_neither_ray_nor_mlflow():
    code = (
        "import importlib, pkgutil, sys, progan\n"
        "for m in pkgutil.walk_packages(progan.__path__, 'progan.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('ray', 'mlflow', 'pipeline'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
