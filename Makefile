# latticaray — set-up, demo, tests, benchmarks.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-mesh test lint fuzz bench venv ray-venv clean interop-deps browser-deps

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

$(STAMP): $(VPY) pyproject.toml
	$(VPY) -m pip install -q -e '.[test,lint]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VPY) examples/runtime_demo.py

demo-mesh: $(STAMP)
	$(VPY) examples/mesh_demo.py

test: $(STAMP) interop-deps browser-deps
	$(VPY) -m pytest -q -p no:cacheprovider tests

# ruff (rules in pyproject.toml), the formatter's check, mypy over the package (strict for the
# sans-I/O cores), and no import cycle (annotation-only TYPE_CHECKING imports aside)
lint: $(STAMP)
	$(VENV)/bin/ruff check latticaray tests bench examples fuzz tools
	$(VENV)/bin/ruff format --check latticaray tests bench examples fuzz tools
	$(VENV)/bin/mypy
	$(VPY) tools/importcycles.py --runtime-only latticaray

# coverage-guided fuzzing of every network decoder (atheris); FUZZ_SECONDS per target
FUZZ_SECONDS ?= 60
FUZZ_SEED ?= 1
fuzz: $(STAMP)
	$(VPY) -m fuzz.run --all --seconds $(FUZZ_SECONDS) --seed $(FUZZ_SEED)

# Ray 2.60 in a virtualenv of its own, for the benchmarks that run Ray beside latticaray
ray-venv: .venv-ray/bin/ray
.venv-ray/bin/ray:
	$(PY) -m venv .venv-ray
	.venv-ray/bin/python -m pip install -q "ray==2.60.0" numpy

# the js-libp2p / Helia peer of tests/interop: installed from its lock file, again only when the
# lock file changes (node_modules is kept between runs); install scripts are not run. `npm ci`
# refuses this lock: the QUIC module's binaries for other platforms are optional and absent here.
JS_PEER := tests/interop/js
$(JS_PEER)/node_modules/.installed: $(JS_PEER)/package.json $(JS_PEER)/package-lock.json
	cd $(JS_PEER) && npm install --ignore-scripts --no-audit --no-fund
	touch $@

interop-deps: $(JS_PEER)/node_modules/.installed

# Debian's chromium and chromedriver for the dashboard's browser test (tests/dashboard), installed
# only when missing; the test drives them over WebDriver with the standard library.
browser-deps:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
		else \
			echo "chromium is missing and this is not root: the dashboard test will skip (CI runs as root)"; \
		fi; \
	fi

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(VPY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
