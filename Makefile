# The two front-door commands: `make demo` (set up, run the main job) and `make test`.
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: setup browser demo test bench clean
setup: $(STAMP)

# pip's output goes to the log; its last line (or, on failure, its tail) is shown.
SETUP_LOG := .retriever/setup.log
$(STAMP): pyproject.toml scripts/setup.sh
	@mkdir -p $(dir $(SETUP_LOG)) && echo "setup: installing into $(VENV) (log: $(SETUP_LOG))"
	@bash scripts/setup.sh > $(SETUP_LOG) 2>&1 || { tail -n 40 $(SETUP_LOG); exit 1; }
	@tail -n 1 $(SETUP_LOG)
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/retriever demo $(ARGS)

browser: setup
	bash scripts/install-browser.sh

test: setup browser
	$(VENV)/bin/python -m pytest $(ARGS)

clean:
	rm -rf .retriever .pytest_cache
