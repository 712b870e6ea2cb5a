"""Tools around the study, never part of a result: benchmarks (``bench``), the GPU readiness check (``gpu_check``),
cost projection (``projection``), random stand-in models and corpora (``standins``) and notebook tidying
(``notebook_tidy``)."""
