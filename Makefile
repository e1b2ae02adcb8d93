# Two entry points do all set-up on a fresh machine:  make train  and  make test.
# GPU users: make train TORCH_SPEC=torch TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
ARGS ?=
PYTEST_ARGS ?=

.PHONY: train train-host dashboard browser test test-browser test-docs test-faults test-distributed test-gpu test-slurm test-notebooks notebooks-full test-compare bench test-all slurm-up slurm-down clean-venv

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(PY) -m pip install -q -e ".[dev]" --config-settings editable_mode=compat  # a .pth path entry: Hydra finds hydra_plugins/
	touch $@

# Train an SAE on a grokked host (the host is trained once and cached under outputs/hosts/).
train: $(VENV)/.installed
	$(PY) scripts/train.py $(ARGS)

# The HTML latent dashboard of a run or sweep dir: make dashboard ARGS=outputs/runs/<date>/<time>
dashboard: $(VENV)/.installed
	$(PY) scripts/dashboard.py $(ARGS)

train-host: $(VENV)/.installed
	$(PY) scripts/train_host.py $(ARGS)

# The fast default suite (a few minutes on 2 cores).
test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow and not slurm and not gpu and not compare and not notebooks and not faults and not distributed and not documented and not browser" $(PYTEST_ARGS)

# Faults injected into real runs: kill -9, SIGTERM, a second process, refusals, divergence, a full
# disk (a small tmpfs: needs root, skipped otherwise), a failing sweep job (a few minutes on 2 cores).
test-faults: $(VENV)/.installed
	$(PY) -m pytest -q -m faults -rs $(PYTEST_ARGS)

# scripts/train.py as two gloo processes: torchrun, a rank killed, a stop signal, resume at another
# world size, refusals (about two minutes on 2 cores).
test-distributed: $(VENV)/.installed
	$(PY) -m pytest -q -m distributed -rs $(PYTEST_ARGS)

# Debian's chromium + chromium-driver (as root, like the SLURM packages), for the dashboard browser tests.
browser:
	bash scripts/install_browser.sh

# Dashboards opened in headless Chromium from file://: no console error, sorting, panels, shared links.
test-browser: $(VENV)/.installed browser
	$(PY) -m pytest -q -m browser -rs $(PYTEST_ARGS)

# Every command in the README's and docs' shell blocks, run as written on a fresh copy of the repo with
# tiny-run overrides appended to training commands (a few minutes on 2 cores; tests/e2e/test_documented_commands.py).
test-docs: $(VENV)/.installed
	$(PY) -m pytest -q -m documented -rs $(PYTEST_ARGS)

# The CUDA paths (sparse kernels vs dense, bf16, compile, NCCL on 2 GPUs); skipped without a GPU.
test-gpu: $(VENV)/.installed
	$(PY) -m pytest -q -m gpu -rs $(PYTEST_ARGS)

# Real sweeps on the local one-node SLURM cluster (start it first: make slurm-up, as root).
test-slurm: $(VENV)/.installed
	$(PY) -m pytest -q -m slurm -rs $(PYTEST_ARGS)

# Every experimental/ notebook executed top to bottom on its small profile (about 6 min on 2 cores).
test-notebooks: $(VENV)/.installed
	$(PY) -m pytest -q -m notebooks -rs $(PYTEST_ARGS)

# The notebooks' full profile: the numbers and figures in experimental/README.md (long).
notebooks-full: $(VENV)/.installed
	$(PY) scripts/run_notebooks.py --profile full --publish $(ARGS)

# SAELens and EleutherAI sparsify as benchmark columns: installs the [compare] extra, then its tests.
$(VENV)/.compare: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,compare]" --config-settings editable_mode=compat
	touch $@

test-compare: $(VENV)/.compare
	$(PY) -m pytest -q -m compare -rs $(PYTEST_ARGS)

# The training benchmark (README "Training speed"); e.g. make bench ARGS="--sizes 128,2048,16"
bench: $(VENV)/.installed
	$(PY) scripts/benchmark.py $(ARGS)

slurm-up:
	bash scripts/slurm/cluster.sh start

slurm-down:
	bash scripts/slurm/cluster.sh stop

# Everything, slow suites included.
test-all: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
