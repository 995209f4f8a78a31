# The two front-door commands: `make demo` (set up, run the main job) and `make test`.
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: setup browser demo test bench clean
setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

demo: setup
	$(VENV)/bin/retriever demo $(ARGS)

browser: setup
	bash scripts/install-browser.sh

test: setup browser
	$(VENV)/bin/python -m pytest $(ARGS)

clean:
	rm -rf .retriever .pytest_cache
