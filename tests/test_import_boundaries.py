"""Import boundaries, each checked in a fresh interpreter: progan/ is plain PyTorch (no Ray,
MLflow or pipeline), and train-local runs on a bare GPU host (no Ray, no MLflow)."""

import subprocess
import sys

from tests.conftest import REPO_ROOT


def assert_imports_leave_out(import_code: str, banned: tuple[str, ...]) -> None:
    """Run `import_code` in a new Python; fail if any `banned` top-level package got loaded."""
    code = (
        f"import sys\n{import_code}\n"
        f"bad = sorted(k for k in sys.modules if k.split('.')[0] in {banned!r})\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_progan_imports_neither_ray_nor_mlflow():
    assert_imports_leave_out(
        "import importlib, pkgutil, progan\n"
        "for m in pkgutil.walk_packages(progan.__path__, 'progan.'):\n"
        "    importlib.import_module(m.name)",
        ("ray", "mlflow", "pipeline"),
    )


def test_train_local_imports_neither_ray_nor_mlflow():
    assert_imports_leave_out(
        "import pipeline.phases.local, pipeline.cli.train_local", ("ray", "mlflow")
    )
