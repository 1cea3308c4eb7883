VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch pinned to what resolves from this machine's local disk; users may pick any torch in pyproject's range
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup fonts java test test-extended test-random demo demo-long bench bench-step lint clean

setup: $(VENV)/.installed fonts java

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[test]'
	touch $@

fonts:
	-command -v apt-get >/dev/null && (dpkg -s fonts-wqy-microhei >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq fonts-wqy-microhei))

# Java runs pycocoevalcap's PTB tokenizer (captioning CIDEr / BLEU-4); without it those metrics are skipped, said so
java:
	-command -v java >/dev/null || (command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless) || echo "warning: no Java: caption metrics (CIDEr/BLEU) will be skipped"

# pytest exits 5 when it collected no tests: that is a failure here, not a pass. TEST_JOBS pytest-xdist workers,
# a test file per worker at a time (module fixtures built once); TEST_JOBS=0 runs everything in this process
TEST_JOBS ?= 2
test: setup
	$(PY) -m pytest -q tests -n $(TEST_JOBS) --dist loadfile; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

# the long tests the default suite leaves out (other engine / family combinations of what it covers)
test-extended: setup
	$(PY) -m pytest -q tests -m extended

# the same suite in a random order (pytest-random-order), in one process: tests must not depend on each other
test-random: setup
	$(PY) -m pytest -q tests -p random_order --random-order -p no:xdist

# the main job: build the embedded demo corpus, then stage 1 -> 2 -> 3 on the CPU with a tiny model, then the
# official evaluators on held-out samples (before / after / trivial baseline) with example PNGs
demo: setup
	$(PY) -m train.demo

# the demo with the longer schedule (about 15 min on 2 cores): a stronger model for the closing evaluation
demo-long: setup
	$(PY) -m train.demo --long

bench: setup
	$(PY) bench/chunked_loss.py
	$(PY) bench/attention.py
	$(PY) bench/data_pipeline.py
	$(PY) bench/step.py --quick
	$(PY) bench/qwen2_vl_step.py --quick

# packed training step vs the official code's padded step: tokens/s, FLOP/s, MFU, memory at 2k/8k/32k
bench-step: setup
	$(PY) bench/step.py

lint: setup
	$(VENV)/bin/ruff check train data tests bench

clean:
	rm -rf $(VENV) .cache outputs
