package opendata

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/citypulse/citypulse/stream"
)

// Run sends changed entities to the live streams every StreamInterval until
// ctx is done. An entity is sent when its simplified form changes, so a value
// that goes stale (and turns "unknown") is sent too.
func (f *Feed) Run(ctx context.Context) error {
	t := time.NewTicker(f.cfg.StreamInterval)
	defer t.Stop()
	var seq uint64
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		if f.hub.Clients() == 0 {
			clear(f.sent) // a new client starts from a snapshot anyway
			continue
		}
		for _, e := range f.snapshot().entities(f.cfg.AlmostFull) {
			kv, _ := json.Marshal(e.keyValues())
			if f.sent[e.id] == string(kv) {
				continue
			}
			f.sent[e.id] = string(kv)
			seq++
			for _, form := range []string{"keyValues", "normalized"} {
				f.hub.Publish(stream.Event{Topic: e.typ + "/" + form + "/" + e.id, Name: "notification",
					Data: notification(seq, []entity{e}, form == "keyValues")})
			}
		}
	}
}

// CloseStreams ends the live streams and refuses new ones (the server is
// stopping).
func (f *Feed) CloseStreams() { f.hub.Close() }

// notification wraps entities as an NGSI-LD Notification.
func notification(seq uint64, es []entity, kv bool) []byte {
	data := make([]map[string]any, len(es))
	for i, e := range es {
		if kv {
			data[i] = e.keyValues()
		} else {
			data[i] = e.normalized()
		}
	}
	b, _ := json.Marshal(map[string]any{
		"id":             fmt.Sprintf("urn:ngsi-ld:Notification:%d", seq),
		"type":           "Notification",
		"subscriptionId": "urn:ngsi-ld:Subscription:citypulse-live",
		"notifiedAt":     time.Now().UTC().Format("2006-01-02T15:04:05.000Z"),
		"data":           data,
	})
	return b
}

// stream serves GET /ngsi-ld/v1/stream?type=T[,T…][&id=…][&options=keyValues]:
// first a notification with the current entities, then one per changed entity.
func (f *Feed) stream(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	types, ids := splitList(q.Get("type")), splitList(q.Get("id"))
	for _, t := range types {
		if t != TypeParkingSpot && t != TypeOffStreetParking && t != TypeTrafficSignal {
			problem(w, http.StatusBadRequest, "BadRequestData", "unknown type "+t)
			return
		}
	}
	if len(types) == 0 {
		types = []string{TypeParkingSpot, TypeOffStreetParking, TypeTrafficSignal}
	}
	form := "normalized"
	if slices.Contains(strings.Split(q.Get("options"), ","), "keyValues") {
		form = "keyValues"
	}
	want := func(e entity) bool {
		return slices.Contains(types, e.typ) && (len(ids) == 0 || slices.Contains(ids, e.id))
	}
	host := clientKey(r)
	if !f.lim.openStream(host) {
		w.Header().Set("Retry-After", "30")
		problem(w, http.StatusTooManyRequests, "TooManyRequests", "too many live streams from this address")
		return
	}
	defer f.lim.closeStream(host)
	snap := func() []stream.Event {
		var now []entity
		for _, e := range f.snapshot().entities(f.cfg.AlmostFull) {
			if want(e) {
				now = append(now, e)
			}
		}
		return []stream.Event{{Name: "notification", Data: notification(0, now, form == "keyValues")}}
	}
	f.hub.Serve(w, r, func(ev stream.Event) bool {
		parts := strings.SplitN(ev.Topic, "/", 3) // type/form/id
		return len(parts) == 3 && parts[1] == form && slices.Contains(types, parts[0]) &&
			(len(ids) == 0 || slices.Contains(ids, parts[2]))
	}, snap)
}
