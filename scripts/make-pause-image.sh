#!/usr/bin/env bash
# Builds the CRI sandbox ("pause") image locally: a static C `pause` (gcc -static) that sleeps
# until SIGINT/SIGTERM (then exits 0) and reaps orphaned children, as Kubernetes' pause does;
# Entrypoint ["/pause"]. Import into containerd's CRI namespace with:
#   ctr -n k8s.io image import OUT.tar
# Usage: make-pause-image.sh OUT.tar [REF]   (REF default: localhost/joey/pause:1)
set -euo pipefail
out=${1:?usage: make-pause-image.sh OUT.tar [REF]}
ref=${2:-localhost/joey/pause:1}
command -v gcc >/dev/null || { echo "make-pause-image: gcc missing (apt-get install gcc)" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/pause.c" <<'EOC'
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_term(int sig) { (void)sig; _exit(0); }

static void on_child(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction term = {.sa_handler = on_term};
  struct sigaction child = {.sa_handler = on_child, .sa_flags = SA_NOCLDSTOP};
  if (sigaction(SIGINT, &term, NULL) < 0 || sigaction(SIGTERM, &term, NULL) < 0 ||
      sigaction(SIGCHLD, &child, NULL) < 0)
    return 1;
  for (;;) pause();
}
EOC
root=$work/root
mkdir -p "$root"
gcc -static -O2 -s -o "$root/pause" "$work/pause.c"
. "$(dirname "$0")/oci-layout.sh"
oci_layout_tar "$root" '{"Entrypoint":["/pause"],"WorkingDir":"/"}' "$ref" "$out" "$work"
echo "$out"
