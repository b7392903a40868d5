import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_import_is_light():
    code = (
        "import sys, rlhf.core; "
        "heavy = [m for m in ('transformers', 'gymnasium', 'accelerate', 'datasets', 'deepspeed') "
        "if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_public_api_reexported():
    import rlhf.core as core

    for name in core.__all__:
        assert callable(getattr(core, name)) or isinstance(getattr(core, name), tuple), name
