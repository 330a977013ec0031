package pipeline

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/citypulse/citypulse/internal/durable"
)

// cursorFile persists one sink's read position in every shard's journal, so that
// after a restart the sink resumes where it was. A position is saved only after
// the sink's Write for everything before it returned; a crash between the two
// replays a batch (at-least-once), never skips one.
type cursorFile struct {
	path string
}

type cursorState struct {
	Sink      string   `json:"sink"`
	Positions []uint64 `json:"positions"`
}

func newCursorFile(dir, sink string) cursorFile {
	return cursorFile{path: filepath.Join(dir, "cursors", sink+".json")}
}

// load returns the saved positions, or zeros (read from the oldest segment) for
// a new sink. A damaged cursor file also yields zeros: replaying is safe.
func (c cursorFile) load(shards int) ([]uint64, error) {
	pos := make([]uint64, shards)
	b, err := os.ReadFile(c.path)
	if errors.Is(err, os.ErrNotExist) {
		return pos, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read sink cursor: %w", err)
	}
	var st cursorState
	if err := json.Unmarshal(b, &st); err != nil || len(st.Positions) != shards {
		return pos, fmt.Errorf("sink cursor %s is damaged or for another shard count; replaying from the oldest journal segment", c.path)
	}
	return st.Positions, nil
}

// save replaces the cursor file without fsync: it is saved every 250 ms per
// sink, and a cursor that a power loss takes (or leaves damaged) only makes
// the sink replay from an older position (at-least-once), which load allows.
func (c cursorFile) save(sink string, pos []uint64) error {
	b, err := json.Marshal(cursorState{Sink: sink, Positions: pos})
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(c.path), 0o755); err != nil {
		return err
	}
	return durable.WriteFile(c.path, b, 0o644, false)
}
