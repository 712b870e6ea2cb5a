"""Execute one notebook for run_all.sh: ``python -m gsae.tools.execute_notebook IN OUT [-p NAME VALUE]...``.

papermill's own command line, with the kernel's connection encrypted: jupyter_client provisions CurveZMQ keys for
kernels whose kernelspec declares support (ipykernel's does), so the kernel does not warn that it "is running over
TCP without encryption" on the terminal. Parameters are passed as strings into the notebook's ``parameters`` cell.
No cell counter or log line is printed: the terminal shows gsae's progress lines (``gsae.progress``), the cells'
errors, and nothing else.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def encryption() -> str:
    """jupyter_client's ``transport_encryption``: "auto" where pyzmq has CurveZMQ, else "disabled"."""
    import zmq

    return "auto" if zmq.has("curve") else "disabled"


def execute(source: str | Path, target: str | Path, parameters: dict[str, str] | None = None,
            kernel_name: str = "python3") -> None:
    """Run ``source`` into ``target`` with ``parameters`` injected (papermill), the kernel on an encrypted
    connection where possible; a failing cell raises papermill's ``PapermillExecutionError``."""
    import papermill
    from traitlets.config import Config

    papermill.execute_notebook(str(source), str(target), parameters=parameters or {}, kernel_name=kernel_name,
                               progress_bar=False, log_output=False,
                               config=Config({"KernelManager": {"transport_encryption": encryption()}}))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gsae.tools.execute_notebook", description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("target", type=Path)
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    ap.add_argument("-k", "--kernel", default="python3")
    a = ap.parse_args(argv)
    execute(a.source, a.target, dict(a.parameter), a.kernel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
