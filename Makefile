# One-command set-up: `make test` and `make demo` create .venv and install everything they need.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
FMNIST_DEB_DIR := /usr/share/datasets/fashion-mnist
# Two cores here: pytest runs in one process using both threads for torch.
export OMP_NUM_THREADS ?= 2

.PHONY: install test lint demo fashion-mnist slurm clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing dscl and its dependencies into $(VENV) (first time: a few minutes)"
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,slurm]' 2>&1 \
		| { grep -v "is ignored: it is neither a file nor a directory" || true; }
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# The real-data tests read Fashion-MNIST: install it the way the demo does, so they run in CI too.
# The launcher tests start a one-node SLURM cluster (tests/slurm_cluster.py) from Debian's packages.
test: lint fashion-mnist slurm
	$(PY) -m pytest -q

# Fashion-MNIST: the Debian package when we are root with apt, else torchvision's downloader.
fashion-mnist:
	@if [ -e $(FMNIST_DEB_DIR)/train-images-idx3-ubyte.gz ] || [ -n "$$DSCL_DATA" -a -d "$$DSCL_DATA/fashion-mnist" ]; then \
		echo "Fashion-MNIST found"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian package dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "no Debian package: the demo will download Fashion-MNIST with torchvision"; \
	fi

# SLURM and munge for the launcher tests: the Debian packages when we are root with apt (the tests
# start and stop the daemons themselves; without the packages those tests are skipped).
slurm:
	@if command -v slurmctld >/dev/null && command -v munged >/dev/null; then \
		echo "SLURM and munge found"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian packages slurm-wlm and munge"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; \
	else \
		echo "no SLURM: the launcher tests will be skipped"; \
	fi

demo: $(STAMP) fashion-mnist
	@where=""; [ -e $(FMNIST_DEB_DIR)/train-images-idx3-ubyte.gz ] || [ -n "$$DSCL_DATA" ] \
		|| where="data.root=data data.download=true"; \
	$(VENV)/bin/dscl run --config configs/fashion_mnist_lt.yaml --name demo --overwrite $$where

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
