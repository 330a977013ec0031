package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// The fence: which site may acknowledge devices.
//
// Each site keeps, in its own key-value bucket (FenceBucket, never mirrored),
// a Record under FenceKey naming the active site and an epoch. The rule:
//
//   - a site's gateways acknowledge a device only while the site's own record
//     names the site (Standby.MayAcknowledge);
//   - the record with the higher epoch wins: a site that sees the other site's
//     record with a higher epoch copies it (so it stops acknowledging), and the
//     active site writes its record into the other site's bucket whenever it
//     can reach it with a lower epoch (a returning primary is fenced as soon
//     as the link is up); equal epochs naming different sites is a conflict
//     and neither site acknowledges;
//   - promotion takes epoch+1 and first fences the other site (a compare-and-
//     set write of the new record into its bucket, through the link) or, when
//     that site cannot be reached, needs the operator's statement that it is
//     down or cut off from every device (PromoteOptions.PeerDown). Without a
//     third site there is no quorum to decide this automatically: a cut link
//     and a dead primary look the same from the standby.

// FenceBucket is the key-value bucket of the fence record at each site, and
// FenceKey its key.
const (
	FenceBucket = "CITYPULSE_DR"
	FenceKey    = "active"
)

// Record names the site that may acknowledge devices.
type Record struct {
	Site  string    `json:"site"`
	Epoch uint64    `json:"epoch"`
	Since time.Time `json:"since"`
	// Diverged is, per stream, the last sequence the site held when it
	// became active (promoted): the old active site's messages after it were
	// not replicated.
	Diverged map[string]uint64 `json:"diverged,omitempty"`
	// Salvaged is, per stream, the old active site's last sequence copied
	// into this site after its return (Salvage).
	Salvaged map[string]uint64 `json:"salvaged,omitempty"`
}

// Wins reports whether r supersedes o (a higher epoch).
func (r Record) Wins(o Record) bool { return r.Epoch > o.Epoch }

// Conflicts reports whether r and o claim the same epoch for different sites.
func (r Record) Conflicts(o Record) bool {
	return r.Epoch == o.Epoch && r.Epoch > 0 && r.Site != o.Site
}

// fence reads and writes the record in one site's bucket.
type fence struct{ kv jetstream.KeyValue }

// openFence opens (creating if asked) the fence bucket at the site js talks to.
func openFence(ctx context.Context, js jetstream.JetStream, create bool, replicas int) (*fence, error) {
	var kv jetstream.KeyValue
	var err error
	if create {
		kv, err = js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket: FenceBucket, History: 8, Replicas: replicas, Storage: jetstream.FileStorage})
	} else {
		kv, err = js.KeyValue(ctx, FenceBucket)
	}
	if err != nil {
		return nil, fmt.Errorf("fence bucket %s: %w", FenceBucket, err)
	}
	return &fence{kv: kv}, nil
}

// read returns the record and its revision; a zero Record and revision 0 if
// none was written yet.
func (f *fence) read(ctx context.Context) (Record, uint64, error) {
	e, err := f.kv.Get(ctx, FenceKey)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return Record{}, 0, nil
	}
	if err != nil {
		return Record{}, 0, fmt.Errorf("read fence record: %w", err)
	}
	var r Record
	if err := json.Unmarshal(e.Value(), &r); err != nil {
		return Record{}, 0, fmt.Errorf("fence record at revision %d: %w", e.Revision(), err)
	}
	return r, e.Revision(), nil
}

// write stores r if the record is still at revision rev (0: absent): two
// writers racing cannot both win.
func (f *fence) write(ctx context.Context, r Record, rev uint64) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	if rev == 0 {
		_, err = f.kv.Create(ctx, FenceKey, b)
	} else {
		_, err = f.kv.Update(ctx, FenceKey, b, rev)
	}
	if err != nil {
		return fmt.Errorf("write fence record (epoch %d, site %s): %w", r.Epoch, r.Site, err)
	}
	return nil
}
