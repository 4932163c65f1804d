"""Suite-wide fixtures and rules.

``arch``: a test that takes it runs once per architecture (``x86_64``, ``i386``).

A test reaches the Debian kernel corpus only when it is marked ``corpus``.

The offline part of the suite (``pytest -m "not corpus and not qemu"``) must run with no
corpus and no network. Every way into the corpus goes through :func:`corpus.ensure`, so an
unmarked test that calls it fails here, naming itself, instead of starting a download.
"""

from __future__ import annotations

from pathlib import Path

import corpus
import pytest
from paths import ARCH_NAMES


@pytest.fixture(autouse=True)
def _corpus_only_when_marked(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if request.node.get_closest_marker("corpus") is not None:
        return

    def refuse(kind: corpus.Kind) -> Path:
        pytest.fail(
            f"{request.node.nodeid} uses the {kind} corpus but is not marked"
            " @pytest.mark.corpus (the offline subset must not fetch it)"
        )

    monkeypatch.setattr(corpus, "ensure", refuse)


@pytest.fixture(params=ARCH_NAMES)
def arch(request: pytest.FixtureRequest) -> str:
    """The architecture's name; tests taking it run for each one."""
    name: str = request.param
    return name
