//go:build tools

// Package tools pins etcd's main package so that `go mod tidy` keeps its
// dependencies; build.sh builds go.etcd.io/etcd/server/v3 from this module.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
)
