//go:build !unix

package certs

import "os"

// inode is unavailable here; size and mtime (and the content hash) still
// detect changes.
func inode(os.FileInfo) uint64 { return 0 }
