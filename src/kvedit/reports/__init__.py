"""Reports from result folders: `kvedit report` (bench_report, tune_report) and `kvedit compare` (compare), drawn
with the one matplotlib helper (plotting)."""
