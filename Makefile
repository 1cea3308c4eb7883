VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch pinned to what resolves from this machine's local disk; users may pick any torch in pyproject's range
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup fonts test demo bench lint clean

setup: $(VENV)/.installed fonts

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[test]'
	touch $@

fonts:
	-command -v apt-get >/dev/null && (dpkg -s fonts-wqy-microhei >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq fonts-wqy-microhei))

# pytest exits 5 when it collected no tests: that is a failure here, not a pass
test: setup
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

# the main job: build the embedded demo corpus, then stage 1 -> 2 -> 3 on the CPU with a tiny model
demo: setup
	$(PY) -m train.demo

bench: setup
	$(PY) bench/chunked_loss.py
	$(PY) bench/data_pipeline.py

lint: setup
	$(VENV)/bin/ruff check train data tests bench

clean:
	rm -rf $(VENV) .cache outputs
