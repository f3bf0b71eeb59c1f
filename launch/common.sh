# Shared by the launch scripts (sourced, not run): their usage text and command display.
# shellcheck shell=bash

usage() {  # The calling script's header comment is its manual; to stderr when called for a mistake.
  local code="${1:-0}"
  { echo "usage ($0):"; awk 'NR == 1 { next } /^#/ { sub(/^# ?/, "  "); print; next } { exit }' "$0"; } |
    if ((code)); then cat >&2; else cat; fi
  exit "$code"
}

shq() {  # Quote words for display the way a person would type them (still valid shell).
  local w out=()
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_@%+=:,./~-]+$ ]]; then out+=("$w")
    elif [[ "$w" != *"'"* ]]; then out+=("'$w'")
    else out+=("$(printf '%q' "$w")"); fi
  done
  echo "${out[*]}"
}
