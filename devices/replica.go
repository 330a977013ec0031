package devices

import "fmt"

// In cluster mode the runtime changes are shared through a key-value bucket
// that every node watches (package clusterstate); a change made on another
// node is applied here with Apply or Drop. They change only the registry in
// memory: the bucket is what persists them, not the overlay file.

// Apply adds d, or replaces the device with its id.
func (r *Registry) Apply(d Device) error {
	if err := d.Validate(); err != nil {
		return fmt.Errorf("apply device change: %w", err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	old := *r.devices.Load()
	if cur, ok := old[d.ID]; ok && cur == d {
		return nil
	}
	r.replace(old, func(m map[string]Device) { m[d.ID] = d })
	return nil
}

// Drop removes the device with the given id; it reports whether there was one.
func (r *Registry) Drop(id string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	old := *r.devices.Load()
	if _, ok := old[id]; !ok {
		return false
	}
	r.replace(old, func(m map[string]Device) { delete(m, id) })
	return true
}

// replace publishes a changed copy of old (the caller holds r.mu).
func (r *Registry) replace(old map[string]Device, change func(map[string]Device)) {
	m := make(map[string]Device, len(old)+1)
	for k, v := range old {
		m[k] = v
	}
	change(m)
	r.devices.Store(&m)
}
