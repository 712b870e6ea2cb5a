"""gsae.progress (terminal progress lines) and gsae.tools.notebook_tidy, checked against hand computations, and one
papermill run: progress reaches the terminal but not the notebook, and a saved figure shows exactly once."""

from __future__ import annotations

import copy
import io
import json
import os
import re
import subprocess
import sys
import time

import nbformat
import pytest

from gsae import progress
from gsae.progress import Console, Settings
from gsae.tools import notebook_tidy


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def quiet_console(tty: bool = False, **settings) -> tuple[Console, io.StringIO, FakeClock]:
    out, clock = io.StringIO(), FakeClock()
    return Console(out, tty=tty, settings=Settings(**settings), clock=clock, heartbeat=False), out, clock


def test_line_has_stage_done_total_rate_and_eta():
    console, out, clock = quiet_console(base_stage="02_train")
    b = progress.bar(total=46, desc="SAEs", unit="SAE", console=console)
    clock.t = 10.0
    b.update(12)
    console.tick()
    # by hand: 12 SAEs in 10 s = 1.20 SAE/s; (46 - 12) / 1.2 = 28.3 s left; the stage has run 10 s
    assert out.getvalue() == "[02_train 00:10] SAEs 12/46 SAE (26%) 1.20 SAE/s ETA 00:28\n"


def test_unit_scale_counts_steps_but_shows_tokens():
    console, out, clock = quiet_console()
    b = progress.bar(total=100, desc="gsae-k8-s0", unit="tok", unit_scale=4096, console=console, leave=True)
    clock.t = 4.0
    b.update(50)
    b.set_postfix(fvu=0.12345, l0=8)
    console.tick()
    # 50 steps x 4096 = 204,800 of 409,600 tokens in 4 s = 51,200 tok/s; 50 steps left at 12.5 steps/s = 4 s
    assert out.getvalue() == "gsae-k8-s0 205k/410k tok (50%) 51.2k tok/s ETA 00:04 fvu=0.1235 l0=8\n"
    clock.t = 8.0
    b.update(50)
    b.close()
    assert out.getvalue().splitlines()[-1] == "gsae-k8-s0 410k/410k tok (100%) in 00:08 (51.2k tok/s) fvu=0.1235 l0=8"


def test_rate_forgets_a_resumed_burst_and_falls_during_a_stall():
    console, _, clock = quiet_console()
    b = progress.bar(total=5000, console=console)
    clock.t = 0.1
    b.update(1000)  # shards found complete on resume: no work, no time
    for t in range(1, 201):
        clock.t = float(t)
        b.update(1)
    # window of 60 s before t = 200 starts after the sample at t = 139 (n = 1139): (1200 - 1139) / 61 = 1.0
    assert b.rate(200.0) == pytest.approx(1.0)
    # stalled until t = 230: the last sample before 170 is t = 169 (n = 1169): 31 / 61
    assert b.rate(230.0) == pytest.approx(31 / 61)


def test_heartbeat_prints_lines_while_updates_are_slow():
    out = io.StringIO()
    console = Console(out, tty=False, settings=Settings(interval_s=0.1))
    b = progress.bar(total=5, desc="slow", console=console)
    time.sleep(0.05)
    b.update(1)
    time.sleep(0.6)  # one slow step: no update for 6 intervals
    console.shutdown()
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("slow 1/5")]
    assert len(lines) >= 3, out.getvalue()
    assert all(re.fullmatch(r"slow 1/5 it \(20%\) [\d.]+ (it/s|s/it) ETA \d\d:\d\d", ln) for ln in lines), lines
    with pytest.raises(ValueError, match="interval_s"):
        Settings(interval_s=45)  # longer than the 30 s run_all.sh promises


def test_tty_redraws_one_line_in_place_and_keeps_finished_stages():
    console, out, clock = quiet_console(tty=True, redraw_s=0.5)
    with progress.stage("harvest", console=console):
        b = progress.bar(total=10, desc="val", unit="tok", console=console, leave=False)
        for i in range(10):
            clock.t = 0.1 * (i + 1)
            b.update(1)
        b.close()
    text = out.getvalue()
    live, finished = text.rsplit("\r\x1b[K", 1)
    assert "\n" not in live  # every redraw returned to the line start
    assert live.count(" val ") == 3  # drawn on open, then at most every 0.5 s of updates (t = 0.5, 1.0)
    assert finished == "[harvest] done in 00:01\n"


def test_disabled_by_env_still_counts(monkeypatch):
    monkeypatch.setenv("GSAE_PROGRESS", "0")
    b = progress.bar(range(7), desc="silent")
    assert b.console is None and list(b) == list(range(7)) and b.n == 7
    with progress.stage("nothing"):
        pass
    monkeypatch.setenv("GSAE_PROGRESS", "maybe")
    with pytest.raises(ValueError, match="GSAE_PROGRESS"):
        progress.bar(total=1)


def test_settings_from_env():
    assert Settings.from_env({}) == Settings()
    env = {"GSAE_STAGE": "02_train", "GSAE_PROGRESS_INTERVAL": "5", "WORLD_SIZE": "2", "RANK": "1"}
    ranked = Settings.from_env(env)
    assert ranked == Settings(interval_s=5.0, base_stage="02_train rank 1", lines_only=True)
    with pytest.raises(ValueError, match="GSAE_PROGRESS_INTERVAL"):
        Settings.from_env({"GSAE_PROGRESS_INTERVAL": "soon"})


# --- notebook_tidy ------------------------------------------------------------------------------------------------

def executed_notebook(root: str, home: str) -> nbformat.NotebookNode:
    v4 = nbformat.v4
    png = f"iVBORw0KGgo{root}AAAA"  # stands for image data that happens to contain the text: must stay
    cells = [
        v4.new_code_cell("lm = load()", outputs=[
            v4.new_output("display_data", data={
                "application/vnd.jupyter.widget-view+json": {"model_id": "abc", "version_major": 2,
                                                             "version_minor": 0},
                "text/plain": "harvest:   0%|          | 0/62000 [00:00<?, ?tok/s]"}),
            v4.new_output("stream", name="stdout", text=f"wrote {root}/SENSITIVITY.md and {root}line\n"),
            v4.new_output("stream", name="stderr", text="step 1/3\rstep 2/3\rstep 3/3\n"),
            v4.new_output("execute_result", execution_count=1,
                          data={"text/plain": f"{{'cache': '{root}/runs/_cache', 'cwd': '{root}'}}"}),
        ]),
        v4.new_code_cell("fig", outputs=[v4.new_output("display_data", data={"image/png": png, "text/plain": "<F>"})]),
        v4.new_code_cell("1/0", outputs=[v4.new_output("error", ename="ZeroDivisionError", evalue="division by zero",
                                                       traceback=[f'File "{home}/lib/x.py", line 3'])]),
    ]
    for c in cells:
        c.metadata["execution"] = {"iopub.status.busy": "2026-11-25T18:41:25.535810Z"}
        c.metadata["papermill"] = {"duration": 0.07, "status": "completed"}
    nb = v4.new_notebook(cells=cells)
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nb.metadata["papermill"] = {"duration": 1115.1, "input_path": f"{root}/notebooks/02_train.ipynb",
                                "output_path": "notebooks/.running-02_train.ipynb"}
    return nb


def test_tidy_removes_widgets_and_machine_paths_and_is_idempotent(tmp_path, monkeypatch):
    root, home = tmp_path / "repo", tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    nb = executed_notebook(str(root), str(home))
    png_before = copy.deepcopy(nb.cells[1].outputs)
    stats = notebook_tidy.tidy_notebook(nb, root)
    # 1 widget output; 5 paths: stdout 1 (not "...repoline"), repr 2, traceback 1, input_path 1; 1 redrawn stream;
    # 4 metadata entries: the widget state and 3 cells' execution timestamps
    assert stats == (1, 5, 1, 4)
    outs = nb.cells[0].outputs
    assert [o.output_type for o in outs] == ["stream", "stream", "execute_result"]
    assert outs[0].text == f"wrote SENSITIVITY.md and {root}line\n"  # only whole path components are rewritten
    assert outs[1].text == "step 3/3\n"
    assert outs[2].data["text/plain"] == "{'cache': 'runs/_cache', 'cwd': '.'}"
    assert nb.cells[1].outputs == png_before  # images untouched
    assert nb.cells[2].outputs[0].traceback == ['File "~/lib/x.py", line 3']
    assert "widgets" not in nb.metadata and all("execution" not in c.metadata for c in nb.cells)
    assert nb.metadata.papermill.input_path == "notebooks/02_train.ipynb"
    assert nb.metadata.papermill.duration == 1115.1 and nb.cells[0].metadata.papermill.duration == 0.07
    nbformat.validate(nb)
    once = copy.deepcopy(nb)
    assert notebook_tidy.tidy_notebook(nb, root) == (0, 0, 0, 0) and nb == once


def test_tidy_file_rewrites_in_place_keeping_permissions(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = tmp_path / "notebooks" / "02_train.ipynb"
    path.parent.mkdir()
    nbformat.write(executed_notebook(str(tmp_path), str(tmp_path / "home")), path)
    path.chmod(0o644)
    assert notebook_tidy.main(["--root", str(tmp_path), str(path)]) == 0
    text = path.read_text()
    assert str(tmp_path) + "/" not in text.replace(f"iVBORw0KGgo{tmp_path}AAAA", "")
    assert json.loads(text)["metadata"]["papermill"]["output_path"] == "notebooks/02_train.ipynb"
    assert path.stat().st_mode & 0o777 == 0o644
    assert not notebook_tidy.tidy_file(path, tmp_path).changed and path.read_text() == text
    with pytest.raises(FileNotFoundError, match="executed .ipynb"):
        notebook_tidy.tidy_file(tmp_path / "missing.ipynb", tmp_path)


# --- through papermill ----------------------------------------------------------------------------------------------

def test_papermill_progress_goes_to_terminal_and_each_figure_shows_once(tmp_path):
    pytest.importorskip("papermill")
    v4 = nbformat.v4
    nb = v4.new_notebook(cells=[
        v4.new_code_cell("import time\nimport matplotlib.pyplot as plt\nfrom gsae import progress\n"
                         "from gsae.analysis import figures as gf"),
        v4.new_code_cell('with progress.stage("count"):\n'
                         '    for _ in progress.bar(range(3), desc="items", unit="item"):\n'
                         '        time.sleep(0.4)'),
        # the recommended plotting cell: no trailing `fig` (the inline backend shows the figure once at cell end)
        v4.new_code_cell("fig, ax = plt.subplots(figsize=(2, 2))\nax.plot([0, 1], [1, 0])\n"
                         "gf.save_figure(fig, 'figures/line.png', {'test': True});"),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "in.ipynb")
    env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "GSAE_PROGRESS")}
    env.update(GSAE_STAGE="nbtest", GSAE_PROGRESS_INTERVAL="0.3")
    run = subprocess.run([sys.executable, "-m", "papermill", "--no-progress-bar", "--log-level", "WARNING",
                          "-k", "python3", "in.ipynb", "out.ipynb"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    terminal = run.stderr
    assert re.search(r"\[nbtest > count \d\d:\d\d\] items [0-3]/3 item \(\d+%\) \S+ \S+ ETA", terminal), terminal
    assert "[nbtest > count] items 3/3 item (100%) in" in terminal and "[nbtest > count] done in" in terminal
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    outputs = [o for c in out.cells for o in c.get("outputs", [])]
    assert not any("nbtest" in json.dumps(o) for o in outputs)  # no progress in the notebook
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1
    assert (tmp_path / "figures" / "line.png").stat().st_size > 0


# --- run_all.sh's notebook runner and the notebooks' setup --------------------------------------------------------

def test_execute_notebook_injects_parameters_on_an_encrypted_kernel_without_a_warning(tmp_path):
    v4 = nbformat.v4
    params = v4.new_code_cell('profile = "default"\ndevice = None')
    params.metadata["tags"] = ["parameters"]
    nb = v4.new_notebook(cells=[params, v4.new_code_cell("print(profile, device)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "in.ipynb")
    run = subprocess.run([sys.executable, "-m", "gsae.tools.execute_notebook", "in.ipynb", "out.ipynb", "-p",
                          "profile", "smoke", "-p", "device", "cpu"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "without encryption" not in run.stderr and run.stdout == "", run.stderr
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert out.cells[-1].outputs[0].text == "smoke cpu\n"


def test_setup_applies_the_notebook_device_parameter(capsys):
    from gsae.config import ConfigError
    from gsae.pipeline import setup

    assert setup("smoke").runtime.device == "auto"
    assert setup("smoke", "cpu").runtime.device == "cpu" and "device: cpu" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="runtime.device"):
        setup("smoke", "npu")
