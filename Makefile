# Plexus developer entry points. Both main commands install what they need on a fresh Debian
# machine (as root): `sudo make test` runs every test tier, `sudo make demo` the local demo.

PYTHON   ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
APT_PKGS := containernetworking-plugins iproute2 iptables containerd runc busybox-static \
            util-linux iputils-ping python3 python3-venv qemu-system-x86 linux-image-amd64 \
            libudev1 graphviz nftables \
            linux-source-6.1 linux-headers-amd64 gcc make binutils xz-utils musl-tools \
            mmdebstrap buildah
STAMP    := $(VENV)/.installed

.PHONY: deps apt venv lint test unit netns kernel shim image print-image print-image-archive bench bench-cri bench-builtins bench-burst bench-sriov \
        bench-controller bench-policy bench-policy-apply bench-multicast bench-mcast-membership \
        protos clean demo chaos

deps: apt venv

apt:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq || echo "apt-get update failed; trying the install with the current lists"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# The compiled shim (shim/plexus-shim.c): static with musl, so a node needs nothing to run it
# (no Python, no libc). Built into the package (metaplugin/bin/plexus, package data), which
# metaplugin/install.py installs into the CNI bin dir.
# musl has no _FORTIFY_SOURCE checks of its own; the flag costs nothing and works with a
# fortify-enabled musl.
SHIM_CC     ?= musl-gcc
SHIM_CFLAGS := -std=c11 -static -Os -Wall -Wextra -Werror -Wshadow -Wformat=2 -Wvla \
               -D_FORTIFY_SOURCE=2 -fstack-protector-strong -Wl,-z,noexecstack,-z,relro,-z,now
SHIM_BIN    := metaplugin/bin/plexus
shim: $(SHIM_BIN)

$(SHIM_BIN): shim/plexus-shim.c
	@mkdir -p $(dir $@)
	$(SHIM_CC) $(SHIM_CFLAGS) -o $@.tmp $<
	strip $@.tmp
	mv -f $@.tmp $@

# The DaemonSet's and the controller's image (deploy/kustomization.yaml names the same ref; a unit
# test holds them together): Debian bookworm by mmdebstrap, the project's wheels in /opt/plexus,
# committed by buildah to an OCI archive. No registry, no Dockerfile. image/build.sh says how.
# Rebuilt only when what goes into it changed (the archive is its own stamp).
IMAGE         ?= ghcr.io/plexus-cni/plexus
IMAGE_TAG     ?= $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
IMAGE_DIR     := build/image
IMAGE_ARCHIVE := $(IMAGE_DIR)/plexus-$(IMAGE_TAG).oci.tar
IMAGE_INPUTS  := pyproject.toml README.md image/build.sh $(SHIM_BIN) $(IMAGE_DIR)/ref \
                 $(shell find cnispec kernel sriov delegates kubeapi netpolicy metaplugin nad_controller \
                     -type f -not -path '*/__pycache__/*' 2>/dev/null)
image: deps $(IMAGE_ARCHIVE)

$(IMAGE_ARCHIVE): $(IMAGE_INPUTS) | $(STAMP)
	image/build.sh $(BIN)/python $@ $(IMAGE):$(IMAGE_TAG)

# The ref the archive carries, rewritten only when it changes: a new IMAGE rebuilds the image.
$(IMAGE_DIR)/ref: FORCE
	@mkdir -p $(@D)
	@echo '$(IMAGE):$(IMAGE_TAG)' | cmp -s - $@ || echo '$(IMAGE):$(IMAGE_TAG)' >$@

print-image:
	@echo '$(IMAGE):$(IMAGE_TAG)'

print-image-archive:
	@echo '$(IMAGE_ARCHIVE)'

.PHONY: FORCE
FORCE:

# Every tier: unit, netns and e2e here (tests/e2e/test_image.py runs plexusd from the image),
# then the kernel tier inside a VM with Debian's kernel.
test: deps lint shim image
	$(BIN)/python -m pytest
	$(MAKE) kernel

# The VM boots linux-image-amd64's kernel; its first run builds netdevsim.ko (Debian leaves it
# out) from linux-source-6.1 against linux-headers-amd64 (same version) and caches it.
kernel: deps
	$(BIN)/python -m tests.vm.runner -- $(BIN)/python -m pytest -q -m kernel tests/kernel

unit: venv
	$(BIN)/python -m pytest -m unit

netns: deps shim
	$(BIN)/python -m pytest -m netns

bench: deps shim
	$(BIN)/python -m bench.shim_cost

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache build *.egg-info $(SHIM_BIN)

demo: deps shim
	$(BIN)/python -m demo.local_demo

bench-builtins: deps shim
	$(BIN)/python -m bench.builtins 60

# 110 pods (kubelet's default maxPods) ADDed at once through the compiled shim, then DELed:
# failures, p50/p90/p99, plexusd's CPU and peak RSS. `--direct` posts to the socket without the shim.
bench-burst: deps shim
	$(BIN)/python -m bench.burst 110 $(BURST_ARGS)

bench-cri: deps shim
	$(BIN)/python -m bench.cri_pods 25

# 10 vs 10,000 NADs in local mode: ADD, first ADD after a NAD change, GC, start-up, idle RSS.
.PHONY: bench-nads
bench-nads: deps
	$(BIN)/python -m bench.nad_scale 60 --nads 10,10000

# SR-IOV: reserve + release against pool size (flat), and uevent -> pool updated latency.
bench-sriov: deps
	$(BIN)/python -m bench.sriov_alloc --n 1000
	$(BIN)/python -m bench.sriov_uevents 30

# Controller: VFPoolNodeState marks VFs unhealthy -> VFPool Degraded, 20 runs (median, p90).
bench-controller: venv
	$(BIN)/python -m bench.controller_latency --runs 20

# Multicast membership, cluster mode: a join/leave on one node -> the other nodes' replicators
# called, through the API stand-in and the controller; 20 joins + 20 leaves (median, p99).
bench-mcast-membership: venv
	$(BIN)/python -m bench.mcast_membership --changes 40

# Policy compiler: 10/100/1,000 policies x 110 local pods + 2,000 peers, compile_world and render.
bench-policy: venv
	$(BIN)/python -m bench.policy_compile --runs 15

# Policy engine: 1,000 policies x 110 pods (netns + veth each) with real nftables: full apply,
# pod add and policy change latency (median, p99), TCP connection setup with vs without rules.
bench-policy-apply: deps
	$(BIN)/python -m bench.policy_apply

# Multicast across nodes on the three-node bed (plexus-overlay): join-to-first-packet latency
# (local mode's flood and cluster mode's MDB), replication cost per member node, underlay
# frames per group packet against a plain bridge + VXLAN flood of the same run; then the routed
# primary's (fabric.multicast): local mode on both fabric modes, cluster mode's listed replication.
# About two minutes.
bench-multicast: deps shim
	$(BIN)/python -m bench.multicast

# Regenerate the kubelet API stubs from the .proto files (written from the public API reference).
protos: venv
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
	    sriov/kubeletapi/deviceplugin_v1beta1.proto sriov/kubeletapi/podresources_v1.proto

# Crash campaign (issue 10): 1,000 ADD/DEL cycles with plexusd SIGKILLed at its failpoints and at
# random moments; prints cycles, kills, DELs, DEL failures and leaks by kind, and fails on any leak
# or failed DEL. As root. Options: make chaos CHAOS_ARGS="--seed 7 --master-gone 0.05" (testbed/chaos.py).
CHAOS_CYCLES ?= 1000
chaos: deps shim
	$(BIN)/python -m testbed.chaos --cycles $(CHAOS_CYCLES) --quiet $(CHAOS_ARGS)

# Fuzzing (tests/fuzz): the long hypothesis profile, >= 100,000 inputs across the targets; prints
# a table of cases tried, failures, tracebacks, hangs and leftovers. `make test` runs the tier's
# bounded `ci` profile.
.PHONY: fuzz
fuzz: deps
	PLEXUS_FUZZ_PROFILE=long $(BIN)/python -m pytest -q -p no:randomly -m fuzz tests/fuzz
