#!/usr/bin/env bash
# The peers' own environment for benchmarks/peers.py: CORDS 0.0.4 (CRAIG, GradMatch),
# apricot-select (CRAIG's submodular optimiser), TRAK (traker), and matplotlib for the plots.
#
# None of these is a dependency of sage-stream. The venv sees the system site-packages, so the
# torch and sage-stream already installed are reused, not downloaded again. A peer that does
# not install or import is reported (the error line, and the full log in
# benchmarks/.venv-peers/*.log) and skipped: peers.py then records it as "not installed".
#
#   bash benchmarks/setup_peers.sh
#   benchmarks/.venv-peers/bin/python benchmarks/peers.py --quick
set -u
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-peers"
python3 -m venv --system-site-packages "$venv"
py="$venv/bin/python"

install() {  # name, then pip arguments
    local name="$1"; shift
    if "$py" -m pip install "$@" >"$venv/install-$name.log" 2>&1; then
        echo "installed $name"
    else
        echo "FAILED to install $name: $(grep -E 'ERROR|error:' "$venv/install-$name.log" | tail -n 1)"
    fi
}

install matplotlib matplotlib
install apricot-select apricot-select
# cords 0.0.4's metadata asks for torchvision, torchtext ~0.10, ray, sphinx and more; the two
# strategies benchmarked need only torch, numpy, scipy and apricot (numba). --no-deps keeps the
# system torch; their real needs come with apricot-select and scikit-learn/scipy.
install cords --no-deps cords==0.0.4
install cords-needs scikit-learn scipy numba tqdm
install traker traker==0.3.2

check() {  # label, python code
    if "$py" -c "$2" >"$venv/import-$1.log" 2>&1; then
        echo "import $1: ok"
    else
        echo "import $1: FAILED: $(tail -n 1 "$venv/import-$1.log")"
    fi
}
check apricot "import apricot"
# The package's own entry point fails here (it imports SELCON -> torchvision, whose PyPI wheels
# do not load against the CPU torch); peer_cases.py loads the two strategy modules directly.
check cords-SL-package "import cords.selectionstrategies.SL"
check cords-strategies "import sys; sys.path.insert(0, '$here'); import peer_cases; peer_cases._cords()"
check trak "from trak import TRAKer"
check matplotlib "import matplotlib"
