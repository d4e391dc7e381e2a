"""results/index.html: every scale's runs (status, time, report, error) and the study's headline files."""

from __future__ import annotations

import html
from pathlib import Path

from studylib.core.storage import atomic_write
from studylib.study.cells import REPORT, read_record
from studylib.training.run_folder import RunFolder

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;width:100%;margin:1em 0}th,td{border-bottom:1px solid #ddd;padding:.35em .6em;
text-align:left;font-size:.92em}th{background:#f5f5f5}.complete{color:#1a7f37}.failed{color:#cf222e;font-weight:bold}
.skipped,.running,.pending,.interrupted{color:#9a6700}code{background:#f5f5f5;padding:0 .2em}
.err{color:#cf222e;font-size:.85em}"""



def write_index(results: str | Path) -> Path:
    """results/index.html: every scale's runs (status, time, report, error) and the study's headline files."""
    results = Path(results)
    sections = []
    for study_file in sorted(results.glob("*/study.json")):
        scale_dir = study_file.parent
        study = read_record(study_file)
        if not study:
            continue
        rows = []
        for entry in study["cells"]:
            folder = scale_dir / entry["name"]
            record = read_record(folder / RunFolder.CELL) or {}
            status = record.get("status", entry["status"])
            # the report only: executed notebooks stay out of git, so a committed index must not link them
            links = [f'<a href="{scale_dir.name}/{entry["name"]}/report.html">report</a>'] \
                if (folder / REPORT).is_file() else []
            error = record.get("error") or entry.get("error")
            seconds = record.get("seconds")
            rows.append(
                f'<tr><td><code>{html.escape(entry["name"])}</code></td><td>{entry["notebook"]}</td>'
                f'<td>{entry.get("arm") or ""}</td><td>{"" if entry.get("seed") is None else entry["seed"]}</td>'
                f'<td class="{status}">{status}</td><td>{"" if seconds is None else f"{seconds / 60:.1f} min"}</td>'
                f'<td>{" · ".join(links)}' + (f'<div class="err">{html.escape(error)}</div>' if error else "")
                + "</td></tr>")
        files = [p for pattern in ("04_compare/*.png", "04_compare/*.csv") for p in sorted(scale_dir.glob(pattern))]
        file_links = " · ".join(f'<a href="{p.relative_to(results).as_posix()}">{p.name}</a>' for p in files)
        sections.append(
            f'<h2 id="{scale_dir.name}">Scale <code>{scale_dir.name}</code></h2>'
            f'<p>{len(study["cells"])} runs, finished {study["finished"][:16].replace("T", " ")} UTC, '
            f'{study["seconds"] / 60:.1f} min for this invocation. '
            f'Corpus: <code>{html.escape(study["manifest"])}</code>.'
            + (f' Start with the <a href="{scale_dir.name}/04_compare/report.html">comparison report</a>.'
               if (scale_dir / "04_compare" / "report.html").is_file() else "") + "</p>"
            "<table><tr><th>run</th><th>notebook</th><th>arm</th><th>seed</th><th>status</th><th>time</th>"
            f'<th>links</th></tr>{"".join(rows)}</table>'
            + (f"<p>Tables and figures: {file_links}</p>" if file_links else ""))
    body = "".join(sections) or "<p>No study has run yet: <code>make study</code>.</p>"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>EnCodec dead-code expiry study</title>"
            f"<style>{_CSS}</style></head><body><h1>Does dead-code expiry work in EnCodec?</h1>"
            "<p>Reports of <code>studylib study</code> (facebookresearch/encodec issue "
            "<a href='https://github.com/facebookresearch/encodec/issues/61'>#61</a>). Each report is a "
            "papermill-executed notebook rendered without its code; tables and figures are beside it.</p>"
            f"{body}</body></html>")
    return atomic_write(results / "index.html", lambda p: p.write_text(page, encoding="utf-8"))
