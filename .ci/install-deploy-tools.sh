#!/usr/bin/env bash
# Installs the tools that tests/deploy uses, from Debian's packages, idempotently:
#   promtool (and the prometheus server)  <- Debian package `prometheus`
#   kubectl with built-in kustomize       <- already present, else Debian `kubectl`
#                                            (if a repository offers it) or `kubernetes-client`
# Always exits 0: a tool that cannot be installed here only makes its tests skip, each
# with the reason. Safe to run again: installed tools are left alone.
set -u

log() { printf 'install-deploy-tools: %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    log "not root and no password-less sudo: installing nothing (tests that need promtool/kubectl skip)"
    exit 0
  fi
fi

if ! command -v apt-get >/dev/null 2>&1; then
  log "no apt-get on this machine: installing nothing"
  exit 0
fi

APT_UPDATED=0
apt_update_once() {
  if [ "$APT_UPDATED" -eq 0 ]; then
    $SUDO apt-get update -qq >/dev/null 2>&1 || log "apt-get update failed (offline?); trying the cached lists"
    APT_UPDATED=1
  fi
}

# Candidate version of a package, or empty when apt does not know one.
apt_candidate() {
  apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}' | grep -v '(none)' || true
}

apt_install() {
  # Installing Debian's prometheus would start the server through its init script;
  # a policy-rc.d that answers 101 forbids starting services during the install.
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1
  local rc=$?
  if [ "$made_policy" -eq 1 ]; then
    $SUDO rm -f /usr/sbin/policy-rc.d
  fi
  return $rc
}

# --- promtool / prometheus --------------------------------------------------------
if command -v promtool >/dev/null 2>&1; then
  log "promtool present: $(promtool --version 2>&1 | head -n1)"
else
  apt_update_once
  if [ -n "$(apt_candidate prometheus)" ]; then
    if apt_install prometheus; then
      log "installed Debian prometheus: $(promtool --version 2>&1 | head -n1)"
    else
      log "apt-get install prometheus failed: promtool tests will skip"
    fi
  else
    log "apt knows no 'prometheus' package: promtool tests will skip"
  fi
fi

# --- kubectl (kustomize is built in) ----------------------------------------------
if command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
  log "kubectl present: $(kubectl version --client 2>/dev/null | tr '\n' ' ')"
else
  apt_update_once
  installed=0
  for pkg in kubectl kubernetes-client; do
    if [ -n "$(apt_candidate "$pkg")" ]; then
      if apt_install "$pkg"; then
        log "installed $pkg $(apt_candidate "$pkg"): $(kubectl version --client 2>/dev/null | tr '\n' ' ')"
        installed=1
        break
      fi
      log "apt-get install $pkg failed"
    fi
  done
  if [ "$installed" -eq 0 ]; then
    log "no kubectl could be installed: kustomize tests will skip"
  else
    # Debian's kubernetes-client 1.20 carries kustomize v2, too old for these overlays;
    # tests/deploy checks the version and skips with that reason.
    :
  fi
fi

exit 0
