"""The documentation cannot drift: the configuration page is the settings classes
rendered, and every relative link in the Markdown pages reaches a file (and a
heading, when it names one) in this repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import Field
from pydantic_settings import BaseSettings

from service.settings_doc import render, render_class
from tests.support.bundles import REPO

PAGES = sorted(
    [REPO / "README.md", REPO / "ARCHITECTURE.md", *(REPO / "docs").glob("*.md")],
)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`+[^`]*`+")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} +(.+?) *#* *$", re.MULTILINE)


def _prose(text: str) -> str:
    """The text a reader follows links in: code blocks and code spans removed."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens,
    a repeated id suffixed -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set()
    for heading in _HEADING.findall(_FENCE.sub("", text)):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(page: Path, text: str) -> list[str]:
    """Links in `text`, read as the page at `page`, that lead nowhere."""
    broken = []
    for target in _LINK.findall(_prose(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path_part, _, anchor = target.partition("#")
        if not path_part:
            if anchor not in anchors(text):
                broken.append(f"{target}: no such heading on this page")
            continue
        linked = (page.parent / path_part).resolve()
        if not linked.is_relative_to(REPO) or not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked.read_text())):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(REPO)}")
    return broken


def test_the_configuration_page_is_the_settings_classes_rendered() -> None:
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == render(), "docs/configuration.md is out of date: run `make docs`"


def test_the_configuration_page_has_a_row_for_every_setting() -> None:
    page = (REPO / "docs" / "configuration.md").read_text()
    for variable in ("MODEL_DIR", "MAX_REQUEST_BYTES", "WEB_CONCURRENCY", "DOCS", "KEEPALIVE"):
        assert f"| `{variable}` |" in page


def test_a_setting_without_a_description_is_refused() -> None:
    class Undocumented(BaseSettings):
        """A setting someone forgot to describe."""

        retries: int = 3

    with pytest.raises(ValueError, match=r"Undocumented\.retries has no description"):
        render_class(Undocumented)


def test_a_computed_default_must_say_what_it_computes() -> None:
    class Computed(BaseSettings):
        workers: int = Field(default_factory=lambda: 4, description="Workers.")

    with pytest.raises(ValueError, match=r"Computed\.workers has a default_factory"):
        render_class(Computed)


def test_a_row_shows_the_variable_type_bounds_default_and_meaning() -> None:
    class Example(BaseSettings):
        """Example settings."""

        batch_wait_ms: float = Field(default=2.0, ge=0, le=1000, description="Wait | fill.")
        mode: str | None = Field(default=None, description="A mode.")

    assert render_class(Example).splitlines()[-2:] == [
        "| `BATCH_WAIT_MS` | number, ≥ 0, ≤ 1000 | `2.0` | Wait \\| fill. |",
        "| `MODE` | string | unset | A mode. |",
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_relative_links_reach_a_file_and_heading_in_the_repository(page: Path) -> None:
    assert broken_links(page, page.read_text()) == []


def test_the_link_check_finds_missing_files_headings_and_escapes() -> None:
    text = (
        "# Top\n"
        "[a](missing.md) [b](api.md#no-such-heading) [c](#top) [d](#bottom) "
        "[e](../../etc/passwd) [f](https://example.com/x.md) `[g](in-code.md)`\n"
        "```\n[h](in-a-block.md)\n```\n"
        "[i](../README.md#ml-api) [j](api.md)\n"
    )
    assert broken_links(REPO / "docs" / "new-page.md", text) == [
        "missing.md: no such file",
        "api.md#no-such-heading: no heading #no-such-heading in docs/api.md",
        "#bottom: no such heading on this page",
        "../../etc/passwd: no such file",
    ]


def test_anchors_follow_github_heading_ids() -> None:
    text = "# Open Inference Protocol (KServe V2)\n## `MAX_BATCH_SIZE` rows\n## Notes\n## Notes\n"
    assert anchors(text) == {
        "open-inference-protocol-kserve-v2",
        "max_batch_size-rows",
        "notes",
        "notes-1",
    }
