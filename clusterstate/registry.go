package clusterstate

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/citypulse/citypulse/devices"
)

// maxDeviceRecord bounds a device's record in the bucket (the id, the kind,
// the district, a group, a location and a secret of at most
// devices.MaxSecretLen fit in far less).
const maxDeviceRecord = 4 << 10

// Registry shares the runtime device changes of every node through a
// JetStream key-value bucket: key = device id, value = the device as JSON
// (with its secret), a delete marker for a removal. Every node watches the
// bucket and applies each change to its devices.Registry; the devices of the
// config file are the base under it, as the overlay file is in one-machine
// mode. It serves the device API (List, Get, Add, Remove).
type Registry struct {
	reg      *devices.Registry
	js       jetstream.JetStream
	bucket   string
	replicas int
	log      *slog.Logger
	applied  *prometheus.CounterVec

	kv    jetstream.KeyValue
	ready chan struct{} // closed once the bucket's contents are applied
}

// NewRegistry builds the sharing of reg through bucket (replicas copies) on
// nc. It starts nothing: Ensure creates the bucket, Run watches it.
func NewRegistry(nc *nats.Conn, reg *devices.Registry, bucket string, replicas int, log *slog.Logger, registerer prometheus.Registerer) (*Registry, error) {
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("device bucket: %w", err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &Registry{reg: reg, js: js, bucket: bucket, replicas: replicas, log: log, ready: make(chan struct{}),
		applied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_cluster_device_changes_total",
			Help: "Device changes read from the shared bucket, by result (applied, removed, rejected: unreadable or invalid)."},
			[]string{"result"})}
	if registerer != nil {
		registerer.MustRegister(r.applied)
	}
	return r, nil
}

// Ensure creates or updates the bucket.
func (r *Registry) Ensure(ctx context.Context) error {
	kv, err := r.js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket: r.bucket, Description: "CityPulse runtime device changes (with credentials)",
		History: 1, MaxValueSize: maxDeviceRecord, Storage: jetstream.FileStorage, Replicas: r.replicas})
	if err != nil {
		return fmt.Errorf("create key-value bucket %s: %w", r.bucket, err)
	}
	r.kv = kv
	return nil
}

// Ready is closed once every change in the bucket when Run started is
// applied (a node should not authenticate devices before).
func (r *Registry) Ready() <-chan struct{} { return r.ready }

// Run applies the bucket's changes, the existing ones first, until ctx is
// done. Ensure must have succeeded.
func (r *Registry) Run(ctx context.Context) error {
	if r.kv == nil {
		return errors.New("device bucket: Ensure was not called")
	}
	w, err := r.kv.WatchAll(ctx)
	if err != nil {
		return fmt.Errorf("watch device bucket %s: %w", r.bucket, err)
	}
	defer func() { _ = w.Stop() }()
	ready := false
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-w.Updates():
			if !ok {
				return fmt.Errorf("watch device bucket %s: ended", r.bucket)
			}
			if e == nil { // the existing values are all delivered
				if !ready {
					ready = true
					close(r.ready)
				}
				continue
			}
			r.apply(e)
		}
	}
}

// apply applies one change from the bucket.
func (r *Registry) apply(e jetstream.KeyValueEntry) {
	if e.Operation() != jetstream.KeyValuePut {
		if r.reg.Drop(e.Key()) {
			r.applied.WithLabelValues("removed").Inc()
		}
		return
	}
	var d devices.Device
	err := json.Unmarshal(e.Value(), &d)
	if err == nil && d.ID != e.Key() {
		err = fmt.Errorf("record of %q under key %q", d.ID, e.Key())
	}
	if err == nil {
		err = r.reg.Apply(d)
	}
	if err != nil {
		r.applied.WithLabelValues("rejected").Inc()
		r.log.Error("device bucket: change rejected", "key", e.Key(), "revision", e.Revision(), "err", err)
		return
	}
	r.applied.WithLabelValues("applied").Inc()
}

// List returns every device, sorted by id.
func (r *Registry) List() []devices.Device { return r.reg.List() }

// Get returns a device.
func (r *Registry) Get(id string) (devices.Device, bool) { return r.reg.Get(id) }

// changeTimeout bounds a change's round trip to the bucket. It outlasts a
// stream leader election (retryWrite): nats-server's followers wait 4-9 s
// (minElectionTimeoutDefault..maxElectionTimeoutDefault in server/raft.go)
// for a lost leader before they campaign, so 20 s allows one full timeout, a
// second round and the answer.
const changeTimeout = 20 * time.Second

// Add registers a device on every node: it is created in the bucket (which
// refuses an id another node added meanwhile) and applied here at once; the
// others apply it when their watch delivers it.
func (r *Registry) Add(d devices.Device) error {
	if err := d.Validate(); err != nil {
		return err
	}
	if _, ok := r.reg.Get(d.ID); ok {
		return fmt.Errorf("%w: %s", devices.ErrDuplicate, d.ID)
	}
	b, err := json.Marshal(d)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), changeTimeout)
	defer cancel()
	err = retryWrite(ctx, func(ctx context.Context, retried bool) error {
		_, err := r.kv.Create(ctx, d.ID, b)
		if retried && errors.Is(err, jetstream.ErrKeyExists) {
			if e, gerr := r.kv.Get(ctx, d.ID); gerr == nil && bytes.Equal(e.Value(), b) {
				return nil // an earlier attempt stored it; its answer was lost
			}
		}
		return err
	})
	if err != nil {
		if errors.Is(err, jetstream.ErrKeyExists) {
			return fmt.Errorf("%w: %s", devices.ErrDuplicate, d.ID)
		}
		return fmt.Errorf("persist device change in bucket %s: %w", r.bucket, err)
	}
	return r.reg.Apply(d)
}

// Remove unregisters a device on every node.
func (r *Registry) Remove(id string) error {
	if _, ok := r.reg.Get(id); !ok {
		return fmt.Errorf("%w: %s", devices.ErrUnknownDevice, id)
	}
	ctx, cancel := context.WithTimeout(context.Background(), changeTimeout)
	defer cancel()
	if err := retryWrite(ctx, func(ctx context.Context, _ bool) error { return r.kv.Delete(ctx, id) }); err != nil {
		return fmt.Errorf("persist device change in bucket %s: %w", r.bucket, err)
	}
	r.reg.Drop(id)
	return nil
}
