#!/usr/bin/env bash
# The test suite with what it needs:  bash scripts/test.sh [PYTEST ARGS...]
#
# tests/test_images.py builds the step image and runs the DAG in it, which needs a Docker
# engine, the docker CLI and debootstrap (and network access to Debian's mirror and PyPI).
# As root with apt-get (Debian, Ubuntu) this installs docker.io and debootstrap and, when no
# engine answers, starts dockerd without a bridge (containers get the host's network only);
# it says what it does as it does it, and leaves dockerd running. Where it cannot (not root,
# no apt-get), it stops at once and says what is missing. Without the image tests, nothing
# is needed:
#   bash scripts/test.sh --deselect tests/test_images.py
# Then it runs `.venv/bin/python -m pytest -q` with the arguments given (the venv comes
# first: python3 -m venv .venv && .venv/bin/pip install -e '.[dev]').
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
python=.venv/bin/python
dockerd_log=${PALP_DOCKERD_LOG:-/tmp/palp-dockerd.log}
without_images="bash scripts/test.sh --deselect tests/test_images.py"

say() { echo "scripts/test.sh: $*" >&2; }
fail() { say "$*"; exit 2; }

# Whether the run includes tests/test_images.py: not when it is deselected or ignored, nor
# when test paths are given and none of them holds it.
images_selected() {
  local prev="" arg path paths=0 holds=0
  for arg in "$@"; do
    case "$prev|$arg" in
      --deselect\|tests/test_images.py|--ignore\|tests/test_images.py|*\|--deselect=tests/test_images.py|*\|--ignore=tests/test_images.py)
        return 1 ;;
    esac
    prev=$arg
    [[ $arg != -* && -e ${arg%%::*} ]] || continue
    path=$(realpath "${arg%%::*}")
    case "$path" in "$repo"|"$repo"/*) ;; *) continue ;; esac  # an option's value elsewhere, not a test path
    paths=$((paths + 1))
    case "$repo/tests/test_images.py" in "$path"|"$path"/*) holds=1 ;; esac
  done
  (( paths == 0 || holds == 1 ))
}

engine_answers() { command -v docker >/dev/null && docker info >/dev/null 2>&1; }

# Install what is missing and start the engine, or stop with what is missing.
provide_docker() {
  local packages=() missing=()
  command -v docker >/dev/null || { packages+=(docker.io); missing+=("the docker CLI"); }
  if ! engine_answers && ! command -v dockerd >/dev/null; then
    [[ " ${packages[*]-} " == *" docker.io "* ]] || packages+=(docker.io)
    missing+=("a Docker engine (dockerd)")
  fi
  command -v debootstrap >/dev/null || { packages+=(debootstrap); missing+=("debootstrap"); }
  local not_root="" no_apt=""
  [[ $(id -u) -eq 0 ]] || not_root=1
  command -v apt-get >/dev/null || no_apt=1
  if (( ${#packages[@]} )); then
    local what=${missing[0]} i
    for (( i = 1; i < ${#missing[@]}; i++ )); do
      what+=$([[ $i -eq $((${#missing[@]} - 1)) ]] && echo " and " || echo ", ")${missing[i]}
    done
    if [[ -n $not_root ]]; then
      fail "tests/test_images.py needs $what, missing here; installing them (apt-get install ${packages[*]}) needs root: run this as root, install them yourself, or run the suite without the image tests: $without_images"
    elif [[ -n $no_apt ]]; then
      fail "tests/test_images.py needs $what, missing here, and there is no apt-get to install them with: install them yourself, or run the suite without the image tests: $without_images"
    fi
    say "installing ${packages[*]} with apt-get (for tests/test_images.py)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
  fi
  if ! engine_answers; then
    [[ -z $not_root ]] || fail "tests/test_images.py needs a running Docker engine: none answers (docker info), and starting dockerd needs root: start one, run this as root, or run the suite without the image tests: $without_images"
    say "starting dockerd --bridge=none --iptables=false (log: $dockerd_log; it keeps running)"
    (dockerd --bridge=none --iptables=false >"$dockerd_log" 2>&1 &)
    for _ in $(seq 60); do engine_answers && break; sleep 1; done
    engine_answers || fail "dockerd did not answer within 60 s; its log, $dockerd_log, ends with: $(tail -n 3 "$dockerd_log" 2>/dev/null | tr '\n' ' ')"
  fi
  say "Docker engine answering, debootstrap at $(command -v debootstrap): the image tests can run"
}

if images_selected "$@"; then
  provide_docker
else
  say "tests/test_images.py is not selected: no Docker engine needed"
fi
[[ -x $python ]] || fail "no $python: create the venv first: python3 -m venv .venv && .venv/bin/pip install -e '.[dev]'"

# The tests run in parallel worker processes (pytest-xdist), one per core up to 4, or
# PALP_TEST_WORKERS of them (1: in this process, as plain pytest); each worker takes a whole
# test file at a time, so a file's shared fixtures (a trained run, a local DAG) are made once.
# Giving -n, --numprocesses, --dist or -p no:xdist yourself turns this off.
parallel=()
workers_chosen() {
  local prev="" arg
  for arg in "$@"; do
    case "$prev|$arg" in
      *\|-n|*\|-n[0-9]*|*\|--numprocesses*|*\|--dist*|-p\|no:xdist|*\|-pno:xdist|*\|--version|*\|-h|*\|--help) return 0 ;;
    esac
    prev=$arg
  done
  return 1
}
if ! workers_chosen "$@"; then
  workers=${PALP_TEST_WORKERS:-$("$python" -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')}
  [[ $workers =~ ^[0-9]+$ && $workers -ge 1 ]] || fail "PALP_TEST_WORKERS must be a whole number of worker processes, 1 or more, not '$workers'"
  (( workers == 1 )) || parallel=(-n "$workers" --dist loadfile)
fi
say "running $python -m pytest -q ${parallel[*]} $*"
exec "$python" -m pytest -q "${parallel[@]}" "$@"
