"""mkdocs hooks (mkdocs.yml ``hooks:``): the generated SUMMARY.md nav files are read by literate-nav and
are not pages of their own."""

from __future__ import annotations

from mkdocs.plugins import event_priority
from mkdocs.structure.files import Files, InclusionLevel


@event_priority(-110)  # after literate-nav (-100) has read them
def on_files(files: Files, config) -> Files:
    for file in files:
        if file.src_uri == "SUMMARY.md" or file.src_uri.endswith("/SUMMARY.md"):
            file.inclusion = InclusionLevel.EXCLUDED
    return files
