"""From metrics to verdicts and pictures: the rows of metrics.jsonl (``rows``), the decision rule
(``decision``), the ledger that applies prereg.yaml (``ledger``), its rendering (``report``, ``readme``), figures and
latent dashboards. Nothing here runs an LM or a stage."""
