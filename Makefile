# Ferry: `make demo` and `make test` are the quick start (Debian 12, as root).
SHELL := /bin/bash
PY := .venv/bin/python
VENV_STAMP := .venv/.ferry-setup
DEB_PACKAGES := iptables nftables python3-nftables containernetworking-plugins python3-bpfcc \
	bpfcc-tools linux-headers-amd64 nginx-light wrk iperf3 curl tshark tcpdump socat \
	nghttp2-client iproute2 python3-venv procps
PYTEST_ARGS ?=

.PHONY: setup demo test unit lint bench clean

setup: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(DEB_PACKAGES)
	touch $@

demo: setup
	$(PY) -m demo.run

test: setup
	$(PY) -m pytest $(PYTEST_ARGS) tests
	$(MAKE) --no-print-directory lint

unit: setup
	$(PY) -m pytest $(PYTEST_ARGS) tests/unit

lint: setup
	.venv/bin/ruff check agent sim bench demo tests
	.venv/bin/ruff format --check agent sim bench demo tests
	.venv/bin/mypy

bench: setup
	$(PY) -m bench.run; s=$$?; [ $$s -ge 128 ] && exit $$s; $(PY) -m bench.run --cross-node; c=$$?; exit $$(( s > c ? s : c ))

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache
