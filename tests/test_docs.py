"""The README stays short, and every relative link and image in README.md and docs/*.md points
to a file that exists."""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
# [text](target) and ![alt](target), with an optional "title" after the target
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def test_readme_is_at_most_300_lines():
    with open(os.path.join(ROOT, "README.md")) as f:
        assert len(f.read().splitlines()) <= 300


def _targets(path):
    with open(path) as f:
        text = f.read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code are code
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text)


@pytest.mark.parametrize("path", DOCS, ids=lambda path: os.path.relpath(path, ROOT))
def test_relative_links_point_to_existing_files(path):
    missing = []
    for target in _targets(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http(s), mailto and the like; an anchor in the same file
        file = target.split("#", 1)[0]
        if not os.path.exists(os.path.join(os.path.dirname(path), file)):
            missing.append(target)
    assert not missing, f"{os.path.relpath(path, ROOT)} links to missing files: {missing}"
