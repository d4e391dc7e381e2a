"""Published numbers the study's reports place beside its own, in one place: far anchors (other data, far larger
models, GPU-days of training), not targets."""

from __future__ import annotations

# The EnCodec paper (Défossez et al. 2022, table 1), 6 kbps, its test set: its streamable 24 kHz model and Opus.
ENCODEC_PAPER_KBPS = 6.0
ENCODEC_PAPER = {"system": "EnCodec paper, 24 kHz streamable", "si_sdr_db": 6.67, "visqol": 4.35}
OPUS_PAPER = {"system": "Opus (paper)", "si_sdr_db": 2.45, "visqol": 2.60}
# the headline tables' row name for it
ENCODEC_PAPER_ROW = "EnCodec paper, 24 kHz streamable (other data, GPU-days)"
