#!/bin/sh
# Builds the Go binding's test binary or its example program, for tests/go/meson.build:
#   go_build.sh GO MODULE_DIR OUTPUT test|example
# (Go 1.19's `go` has no -C, hence this script: it must run inside the module.)
set -eu
go=$1
cd "$2"
case "$4" in
  test) exec "$go" test -c -o "$3" . ;;
  example) exec "$go" build -o "$3" ./examples/train ;;
  *) echo "go_build.sh: unknown kind '$4'" >&2; exit 2 ;;
esac
