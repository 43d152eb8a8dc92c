# The README's two commands, `make demo` and `make test`, run in .venv, which holds exactly the versions in
# requirements/lock.txt: the set the suite and the demo last passed on. .venv is rebuilt from scratch whenever the
# lock or pyproject.toml changes.
#
#   make test-latest   the suite and `emkd demo --quick` on the newest releases pip finds today (.venv-latest)
#   make lock          make test-latest, then write its environment to requirements/lock.txt
#   make test-oldest   the suite on the lower bounds of pyproject.toml, requirements/oldest.txt (.venv-oldest)
#
# torch is installed on its own, first, as $(TORCH) (the CPU build of the locked version), so that nothing pulls a
# multi-GB CUDA wheel on a machine without a GPU; set TORCH="torch==X --index-url ..." for another build.
PYTHON ?= python3
TORCH  ?= torch==2.13.0
LOCK   := requirements/lock.txt
OLDEST := requirements/oldest.txt
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST := -m pytest -q -p no:cacheprovider

.PHONY: demo test install test-latest test-oldest lock clean

# $(call fresh_env,DIR,CONSTRAINTS): a new virtual environment in DIR with pip's tools, torch and emkd[dev];
# CONSTRAINTS is empty (the newest releases) or `-c FILE`. emkd is built without build isolation so that its build
# back-end (setuptools) is the constrained one too.
define fresh_env
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade $(2) pip setuptools wheel
	$(1)/bin/python -m pip install -q $(2) "$(TORCH)"
	$(1)/bin/python -m pip install -q $(2) --no-build-isolation -e ".[dev]"
	$(1)/bin/python -m pip check
	$(1)/bin/python -m emkd --version
endef

$(STAMP): pyproject.toml $(LOCK)
	$(call fresh_env,$(VENV),-c $(LOCK))
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m emkd demo

test: $(STAMP)
	$(PY) $(PYTEST)

test-latest:
	$(call fresh_env,.venv-latest,)
	.venv-latest/bin/python $(PYTEST)
	.venv-latest/bin/python -m emkd demo --quick --out runs/demo-latest

lock: test-latest
	.venv-latest/bin/python tools/write_lock.py $(LOCK)

test-oldest:
	$(call fresh_env,.venv-oldest,-c $(OLDEST))
	.venv-oldest/bin/python $(PYTEST)

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest runs .pytest_cache .hypothesis
