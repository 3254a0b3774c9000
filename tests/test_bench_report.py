"""bench/report.py carries the hand-kept section of other builds over to the regenerated RESULTS.md."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
import report  # noqa: E402


def test_kept_section_is_everything_from_its_heading_on():
    kept = f"{report.KEPT_HEADING}\n\n| build | ms |\n|---|---|\n| x86-64-v3 | 31.6 |\n"
    previous = f"# Benchmark results\n\n## Results\n\n| a | b |\n\n{kept}\n\n"
    assert report.kept_section(previous) == kept


def test_no_kept_section_without_its_heading_at_a_line_start():
    assert report.kept_section("# Benchmark results\n\n## Results\n") == ""
    assert report.kept_section(f"# Results\n\nsee `{report.KEPT_HEADING}`\n") == ""


def test_main_appends_the_kept_section(tmp_path, monkeypatch, capsys):
    kept = f"{report.KEPT_HEADING}\n\nrows\n"
    previous = tmp_path / "RESULTS.md"
    previous.write_text(f"# old\n\n{kept}")
    data = tmp_path / "latest.json"
    data.write_text("{}")
    monkeypatch.setattr(report, "render", lambda d: "# new\n\n## Results\n")
    assert report.main(["report.py", str(data), str(previous)]) == 0
    assert capsys.readouterr().out == f"# new\n\n## Results\n\n{kept}"
    assert report.main(["report.py", str(data), str(tmp_path / "missing.md")]) == 0
    assert capsys.readouterr().out == "# new\n\n## Results\n"
