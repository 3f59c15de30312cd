# hifi-portrait: every target sets itself up on a fresh machine (python3 + package registries).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: chromium install demo test bench bench-download bench-faces bench-cluster bench-stats train clean help

help:
	@echo "make demo    build the demo corpus from the photos in data/demo (offline)"
	@echo "make test    run the test suite"
	@echo "make bench   run every benchmark (bench-download, bench-faces, bench-cluster)"
	@echo "make train   train the tiny config on the demo shards (CPU)"

install: $(STAMP)

# torch==2.13.0 resolves to the CPU wheel on disk; insightface goes in without its deps because
# they would replace opencv-python-headless with the GUI build (DESIGN.md).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps -c constraints.txt insightface==2.1
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m datakit.demo

# The report tests render the page in Debian's headless chromium; installed here when missing.
chromium:
	sh scripts/ensure_chromium.sh

test: $(STAMP) chromium
	$(PY) -m pytest $(PYTEST_ARGS)

bench: bench-download bench-faces bench-cluster bench-stats

bench-download: $(STAMP)
	$(PY) benchmarks/bench_download.py

bench-faces: $(STAMP)
	$(PY) benchmarks/bench_faces.py

bench-cluster: $(STAMP)
	$(PY) benchmarks/bench_cluster.py

bench-stats: $(STAMP)
	$(PY) benchmarks/bench_stats.py

clean:
	rm -rf manifests/demo .pytest_cache
