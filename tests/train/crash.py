"""A run killed at the worst moment: right after it writes its first ``checkpoint_last.pt``."""
import pytest

from ctssl.train import pretrain
from ctssl.train.checkpoint import LAST


class CrashAfterCheckpoint(Exception):
    """What ``run_until_first_checkpoint`` raises inside the run, as a kill would stop it."""


def run_until_first_checkpoint(cfg, exc: type[BaseException] = CrashAfterCheckpoint) -> None:
    """Run ``cfg``; raise ``exc`` in it right after its first ``checkpoint_last.pt`` is on disk."""
    save = pretrain._Run._save

    def save_then_crash(self, name, *args, **kwargs):
        path = save(self, name, *args, **kwargs)
        if name == LAST:
            raise exc
        return path

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretrain._Run, "_save", save_then_crash)
        with pytest.raises(exc):
            pretrain.run_pretraining(cfg)
