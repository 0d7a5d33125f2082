# clawfleet — common tasks. `make help` lists them.

CARGO ?= cargo
AGENT_IMAGE ?= clawfleet-agent-stub:dev
# The PostgreSQL server the tests create their throwaway databases on (.ci/run sets one up).
CLAWFLEET_TEST_PG_URL ?= postgres://clawfleet:clawfleet@127.0.0.1:5432/postgres
export CLAWFLEET_TEST_PG_URL

.PHONY: help build test lint fmt agent-image run demo demo-stop bench clean image deploy-check test-deploy chaos-soak

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

build: ## Build clawfleet (release)
	$(CARGO) build --release --bin clawfleet

test: agent-image ## Run every test (needs Docker and the test PostgreSQL; see .ci/run)
	$(CARGO) nextest run --workspace --no-fail-fast

lint: ## rustfmt check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all

agent-image: ## Build the test agent image clawfleet-agent-stub:dev (FROM scratch)
	IMAGE=$(AGENT_IMAGE) bash agent-stub/build-image.sh

bench: agent-image ## Benchmark (~10 min): convergence, event/row-change latency, 10k/100k users, wakes; a table and a summary line (BENCH_* env vars shrink it)
	$(CARGO) bench --bench converge

# The chaos tests (tests/chaos/, one file per scenario) run small and bounded in `make test`; the
# soak runs them longer and bigger. Override any of these; CHAOS_SEED=N
# replays the random choices a test printed.
CHAOS_ROUNDS ?= 20
CHAOS_USERS ?= 100
CHAOS_SECONDS ?= 120

chaos-soak: agent-image ## Chaos tests, longer and bigger (CHAOS_ROUNDS, CHAOS_USERS, CHAOS_SECONDS)
	CHAOS_ROUNDS=$(CHAOS_ROUNDS) CHAOS_USERS=$(CHAOS_USERS) CHAOS_SECONDS=$(CHAOS_SECONDS) \
		$(CARGO) nextest run --test chaos --no-fail-fast --no-capture

run: build ## Run the controller on the embedded defaults (SQLite under ./data; creates a key if none)
	./target/release/clawfleet run

demo: build agent-image ## Start clawfleet on the stand-in agent image, create users, watch them converge
	bash scripts/demo.sh

demo-stop: ## Stop the demo controller and remove the demo's containers
	bash scripts/demo-stop.sh

clean: ## Remove build output
	$(CARGO) clean

# Deployment (deploy/): the clawfleet image, and checks of the compose file, alerts and dashboard.
CLAWFLEET_IMAGE ?= clawfleet:dev

image: ## Build the clawfleet image clawfleet:dev (FROM scratch, static binary; deploy/build-image.sh)
	IMAGE=$(CLAWFLEET_IMAGE) bash deploy/build-image.sh

deploy-check: ## Check deploy/: alert rules and their unit tests, Prometheus config, compose file, dashboard JSON
	promtool check rules deploy/prometheus/alerts.yml
	promtool test rules deploy/prometheus/alerts_test.yml
	promtool check config deploy/prometheus/prometheus.yml
	docker-compose --env-file deploy/.env.example -f deploy/docker-compose.yml config -q
	python3 -m json.tool deploy/grafana/clawfleet.json >/dev/null

test-deploy: agent-image ## Test deploy/: build the image, converge three users with it, validate the files
	$(CARGO) nextest run --test deploy --no-fail-fast
