"""Tools around the study, never part of a result: benchmarks (``bench``), the GPU readiness check (``gpu_check``),
cost projection (``projection``), random stand-in models and corpora (``standins``), notebook execution and tidying
for run_all.sh (``execute_notebook``, ``notebook_tidy``) and the offline bundle for a machine without network
(``bundle``)."""
