# Ferry: `make demo` and `make test` are the quick start (Debian 12, as root).
SHELL := /bin/bash
PY := .venv/bin/python
VENV_STAMP := .venv/.ferry-setup
# The Debian packages setup installs: one list, also for the Vagrantfile and the Containerfile.
DEB_PACKAGES_FILE := scripts/debian-packages.txt
# Three workers, a module per worker at a time (tests/conftest.py says which modules run alone);
# PYTEST_ARGS= runs them one after another.
PYTEST_ARGS ?= -n 3 --dist loadfile
# make fuzz: seconds per atheris target, and which targets (comma-separated; default all)
FUZZ_SECONDS ?= 60
TARGET ?=

.PHONY: setup demo test unit lint bench clean fresh-check fuzz fuzz-corpus install

CNI_PLUGIN := build/ferry-cni

setup: $(VENV_STAMP) $(CNI_PLUGIN)

$(VENV_STAMP): pyproject.toml scripts/setup.sh $(DEB_PACKAGES_FILE)
	bash scripts/setup.sh
	touch $@

# The chained CNI plugin: a static C program, since the runtime runs it in the host's mount
# namespace where no Python may be (cni/ferry-cni.c says how it works; `agent cni install`).
$(CNI_PLUGIN): cni/ferry-cni.c
	mkdir -p build
	gcc -O2 -static -Wall -Wextra -Werror -std=c11 -o $@ cni/ferry-cni.c

# The README's quick start (make demo, make test) on a pristine Debian 12 root built with
# debootstrap, in a chroot: run it whenever setup changes. Takes minutes; not part of make test.
# KEEP=1 keeps the root, CACHE=1 reuses downloaded Debian packages (scripts/fresh-check.sh).
fresh-check:
	bash scripts/fresh-check.sh

# Ferry as a service on a plain host (README: Plain Linux host; scripts/install.sh): PREFIX
# (default /opt/ferry) with its own venv, the systemd units in UNITDIR (default
# /etc/systemd/system), `agent` in BINDIR (default /usr/local/bin), /etc/default/ferry and
# /etc/ferry/ferry.yaml when missing; DESTDIR stages it all for a package; VENV=.venv runs the
# checkout's venv instead of making one.
install:
	PREFIX="$(PREFIX)" DESTDIR="$(DESTDIR)" UNITDIR="$(UNITDIR)" BINDIR="$(BINDIR)" VENV="$(VENV)" \
		bash scripts/install.sh

demo: setup
	$(PY) -m demo.run

test: setup
	$(PY) -m pytest $(PYTEST_ARGS) tests
	$(MAKE) --no-print-directory lint

unit: setup
	$(PY) -m pytest $(PYTEST_ARGS) tests/unit

lint: setup
	.venv/bin/ruff check agent sim bench demo tests fuzz deploy
	.venv/bin/ruff format --check agent sim bench demo tests fuzz deploy
	.venv/bin/mypy
	.venv/bin/lint-imports --no-cache

# Every parser of untrusted bytes under atheris, FUZZ_SECONDS each (fuzz/run.py; a table of
# executions, crashes written to fuzz/crashes/); `make fuzz FUZZ_SECONDS=10 TARGET=http1`.
fuzz: setup
	$(PY) -m fuzz.run --seconds $(FUZZ_SECONDS) $(if $(TARGET),--target $(TARGET))

# The seeds of every target (or TARGET's) written again into fuzz/corpus/ (kept in the repo).
fuzz-corpus: setup
	$(PY) -m fuzz.corpus $(if $(TARGET),--target $(TARGET))

# SOAK_CYCLES: pod create/delete cycles of the churn soak (bench/soak.py, a few s each).
SOAK_CYCLES ?= 500
# Every table in one run; the exit status is the worst of them (a signal stops at once).
bench: setup
	@worst=0; for b in "bench.run" "bench.run --cross-node" "bench.directory" "bench.cli_latency" "bench.policy" "bench.pod_start" "bench.upgrade" "bench.soak --cycles $(SOAK_CYCLES)" "bench.hostile" "bench.repair" "bench.telemetry"; do \
		$(PY) -m $$b; s=$$?; [ $$s -ge 128 ] && exit $$s; [ $$s -gt $$worst ] && worst=$$s; \
	done; exit $$worst

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache
