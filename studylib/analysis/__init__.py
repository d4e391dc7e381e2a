"""Reading results: run records (`records`), statistics over seeds (`stats`), tables and figures (`reports`), the
reports' assertions (`claims`), and one module per analysis: `anatomy` (01), `audit` (05), `recipe` (06), `horizon`
(07), `regimes` (08), `findings` (summary.csv, the READMEs' headline)."""
