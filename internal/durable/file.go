package durable

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// WriteFile replaces path with data through path+".tmp" renamed over it.
//
// With sync set the temporary file is fsynced before the rename and the
// directory after it: when WriteFile returns, the new content survives a
// power loss. Without sync the new content survives a crash of the process
// (it is in the page cache) but a power loss may take it, and on some file
// systems leave an empty file: readers of such files must treat damage as
// "no saved state".
func WriteFile(path string, data []byte, perm os.FileMode, sync bool) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, perm)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil && sync {
		err = f.Sync()
	}
	if err = errors.Join(err, f.Close()); err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	if sync {
		if err := SyncDir(filepath.Dir(path)); err != nil {
			return fmt.Errorf("write %s: %w", path, err)
		}
	}
	return nil
}

// SyncDir fsyncs a directory, which makes the entries created, renamed or
// removed in it durable.
func SyncDir(dir string) error { return SyncFile(dir) }

// SyncFile fsyncs the file (or directory) at path.
func SyncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	return errors.Join(f.Sync(), f.Close())
}
