package runner

import (
	"fmt"
	"io"
	"os"
	"path"
	"strings"
)

// cpioWriter writes a "newc" cpio archive, the format the kernel unpacks as
// an initramfs. Parent directories must be written before their entries.
type cpioWriter struct {
	w    io.Writer
	off  int64
	ino  uint32
	err  error
	dirs map[string]bool
}

func newCPIOWriter(w io.Writer) *cpioWriter {
	return &cpioWriter{w: w, ino: 1, dirs: map[string]bool{"": true, ".": true}}
}

const (
	cpioDir     = 0o040000
	cpioFile    = 0o100000
	cpioSymlink = 0o120000
	cpioChar    = 0o020000
)

func (c *cpioWriter) write(b []byte) {
	if c.err != nil {
		return
	}
	n, err := c.w.Write(b)
	c.off += int64(n)
	c.err = err
}

func (c *cpioWriter) pad() {
	if r := c.off % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}

func (c *cpioWriter) header(name string, mode uint32, size int64, rdevMajor, rdevMinor uint32) {
	name = strings.TrimPrefix(path.Clean("/"+name), "/")
	if name != "TRAILER!!!" {
		if dir := path.Dir(name); !c.dirs[dir] {
			c.err = fmt.Errorf("cpio: parent of %s not written", name)
			return
		}
	}
	if size > 0xffffffff {
		c.err = fmt.Errorf("cpio: %s too large (%d bytes)", name, size)
		return
	}
	nlink := uint32(1)
	if mode&0o170000 == cpioDir {
		nlink = 2
		c.dirs[name] = true
	}
	ino := c.ino
	c.ino++
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		ino, mode, 0, 0, nlink, 0, size, 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	c.write([]byte(hdr))
	c.write([]byte(name + "\x00"))
	c.pad()
}

// Dir adds a directory.
func (c *cpioWriter) Dir(name string, perm uint32) {
	c.header(name, cpioDir|perm, 0, 0, 0)
}

// MkdirAll adds dir and any parents not written yet.
func (c *cpioWriter) MkdirAll(dir string) {
	dir = strings.TrimPrefix(path.Clean("/"+dir), "/")
	if c.dirs[dir] {
		return
	}
	c.MkdirAll(path.Dir(dir))
	c.Dir(dir, 0o755)
}

// File adds a regular file with the given contents.
func (c *cpioWriter) File(name string, perm uint32, data []byte) {
	c.header(name, cpioFile|perm, int64(len(data)), 0, 0)
	c.write(data)
	c.pad()
}

// CopyFile adds the regular file at hostPath under name.
func (c *cpioWriter) CopyFile(name string, perm uint32, hostPath string) {
	if c.err != nil {
		return
	}
	fh, err := os.Open(hostPath)
	if err != nil {
		c.err = err
		return
	}
	defer fh.Close()
	st, err := fh.Stat()
	if err != nil {
		c.err = err
		return
	}
	c.header(name, cpioFile|perm, st.Size(), 0, 0)
	if c.err != nil {
		return
	}
	n, err := io.Copy(c.w, fh)
	c.off += n
	if err == nil && n != st.Size() {
		err = fmt.Errorf("cpio: %s changed size while copying", hostPath)
	}
	c.err = err
	c.pad()
}

// Symlink adds a symbolic link name -> target.
func (c *cpioWriter) Symlink(name, target string) {
	c.header(name, cpioSymlink|0o777, int64(len(target)), 0, 0)
	c.write([]byte(target))
	c.pad()
}

// CharDev adds a character device node.
func (c *cpioWriter) CharDev(name string, perm, major, minor uint32) {
	c.header(name, cpioChar|perm, 0, major, minor)
}

// Close writes the trailer and returns the first error met.
func (c *cpioWriter) Close() error {
	c.header("TRAILER!!!", 0, 0, 0, 0)
	return c.err
}
