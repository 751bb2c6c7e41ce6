"""The checkpoint package's surface: every exported name resolves, and the torch-free parts
(the package itself, ``meta``, ``format``, ``lock``, ``errors``) import without torch."""

import subprocess
import sys

import megatron_m2.checkpoint as checkpoint
from tests.helpers.tools import ROOT


def test_every_exported_name_resolves():
    for name in checkpoint.__all__:
        assert getattr(checkpoint, name) is not None, name
    assert "optimizer_state_holders" in checkpoint.__all__
    assert not any(name.startswith("_") for name in checkpoint.__all__)


def test_torch_free_modules_do_not_import_torch():
    code = ("import sys; import megatron_m2.checkpoint.meta, megatron_m2.checkpoint.format, "
            "megatron_m2.checkpoint.lock; "
            "from megatron_m2.checkpoint import TRACKER, CheckpointError, holds_checkpoint, "
            "register_parameter_group, SaveLock; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
