"""cli.main collects young objects less often while a command runs, and puts the
process's garbage-collector thresholds back however the command ends."""

from __future__ import annotations

import contextlib
import gc
import io

import pytest

from pvpatch import cli


def test_threshold_raised_during_a_command_and_restored(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    seen: list[tuple[int, int, int]] = []
    real = cli.build_parser

    def spy() -> object:
        seen.append(gc.get_threshold())
        return real()

    monkeypatch.setattr(cli, "build_parser", spy)
    before = gc.get_threshold()
    gc.set_threshold(700, 9, 8)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(["layouts"]) == 0
        assert gc.get_threshold() == (700, 9, 8)
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit):
            cli.main(["--version"])  # argparse exits from inside the command
        assert gc.get_threshold() == (700, 9, 8)
    finally:
        gc.set_threshold(*before)
    assert seen == [(cli.YOUNG_GC_THRESHOLD, 9, 8)] * 2
