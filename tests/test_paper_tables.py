"""The paper tables in docs/results.md and README.md are what the shipped runs in results/ give,
and reading a shipped run (``oodlab report``) leaves it byte for byte as it was."""

from __future__ import annotations

import hashlib
import shutil

import pytest
from conftest import REPO

from oodlab import paper_tables
from oodlab.paper_tables import TABLES


def test_every_paper_has_a_shipped_study_of_at_least_three_seeds():
    assert {t.key for t in TABLES} == {"000", "001-003", "002", "004"}
    for t in TABLES:
        rows = paper_tables.rows(t)
        assert rows and all(n >= 3 for _, n, _ in rows), (t.key, rows)


def test_docs_tables_are_generated_from_results():
    """Fails when a doc's table was edited by hand or results/ changed without
    ``python -m oodlab.paper_tables``."""
    assert paper_tables.update(TABLES, check=True) == []
    assert paper_tables.update([TABLES[-1]], check=True) == []  # --only: README keeps every paper's line


def test_a_table_is_spliced_between_its_markers_only():
    text = "a\n<!-- paper-table:x -->\nold\n<!-- /paper-table:x -->\nb\n"
    assert paper_tables.splice(text, "x", "new") == "a\n<!-- paper-table:x -->\nnew\n<!-- /paper-table:x -->\nb\n"
    with pytest.raises(ValueError, match="paper-table:y"):
        paper_tables.splice(text, "y", "new")


def test_report_of_a_shipped_study_prints_its_table_and_writes_nothing(tmp_path):
    from oodlab.report import report

    t = TABLES[0]
    folder = tmp_path / t.folder
    shutil.copytree(REPO / "results" / t.folder, folder)
    digest = lambda: {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in folder.rglob("*") if p.is_file()}
    before = digest()
    md = report(folder, t.studies[0])
    assert "AUC BPD" in md and "[0.46 (0.05)]" in md  # the paper's figure beside ours
    assert digest() == before
