package opendata

import (
	"encoding/json"
	"net/http"
	"slices"
	"strconv"
	"strings"
)

// The JSON-LD contexts the entities are expressed in: the NGSI-LD core, the
// Smart Data Models parking terms, and CityPulse's own terms for TrafficSignal.
const (
	coreContext    = "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.8.jsonld"
	parkingContext = "https://raw.githubusercontent.com/smart-data-models/dataModel.Parking/master/context.jsonld"
	contextPath    = "/ngsi-ld/contexts/citypulse.jsonld"
)

var ldContext = []any{
	parkingContext,
	map[string]string{
		"TrafficSignal": "urn:citypulse:TrafficSignal",
		"signalState":   "urn:citypulse:signalState",
		"corridor":      "urn:citypulse:corridor",
	},
	coreContext,
}

// Paging limits (NGSI-LD's default page is 20).
const (
	defaultLimit = 20
	maxLimit     = 1000
)

// Handler serves the feed: GET /ngsi-ld/v1/entities, /ngsi-ld/v1/entities/{id},
// /ngsi-ld/v1/stream (server-sent events) and the JSON-LD context. No token;
// every request passes the per-client rate limit first.
func (f *Feed) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /ngsi-ld/v1/entities", f.list)
	mux.HandleFunc("GET /ngsi-ld/v1/entities/{id}", f.get)
	mux.HandleFunc("GET /ngsi-ld/v1/stream", f.stream)
	mux.HandleFunc("GET "+contextPath, func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/ld+json")
		_ = json.NewEncoder(w).Encode(map[string]any{"@context": ldContext})
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if ok, reason := f.lim.allow(r); !ok {
			w.Header().Set("Retry-After", "1")
			problem(w, http.StatusTooManyRequests, "TooManyRequests", "rate limited ("+reason+"): slow down")
			return
		}
		w.Header().Set("Access-Control-Allow-Origin", "*")
		mux.ServeHTTP(w, r)
	})
}

// problem writes an NGSI-LD ProblemDetails error.
func problem(w http.ResponseWriter, code int, typ, detail string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(map[string]any{
		"type":   "https://uri.etsi.org/ngsi-ld/errors/" + typ,
		"title":  http.StatusText(code),
		"detail": detail,
	})
}

// wantsLD says the client asked for JSON-LD (the @context in the body); it is
// false for plain JSON (the @context in a Link header). ok is false when the
// client accepts neither.
func wantsLD(r *http.Request) (ld, ok bool) {
	acc := r.Header.Get("Accept")
	if acc == "" {
		return false, true
	}
	for _, part := range strings.Split(acc, ",") {
		mt := strings.TrimSpace(strings.SplitN(part, ";", 2)[0])
		switch mt {
		case "application/ld+json":
			return true, true
		case "application/json", "application/*", "*/*":
			ok = true
		}
	}
	return false, ok
}

// render writes entities (one, or a list) in the asked representation.
func (f *Feed) render(w http.ResponseWriter, r *http.Request, es []entity, one bool) {
	ld, ok := wantsLD(r)
	if !ok {
		problem(w, http.StatusNotAcceptable, "NotAcceptable", "this API answers application/json or application/ld+json")
		return
	}
	kv := slices.Contains(strings.Split(r.URL.Query().Get("options"), ","), "keyValues")
	out := make([]map[string]any, len(es))
	for i, e := range es {
		if kv {
			out[i] = e.keyValues()
		} else {
			out[i] = e.normalized()
		}
		if ld {
			out[i]["@context"] = ldContext
		}
	}
	if ld {
		w.Header().Set("Content-Type", "application/ld+json")
	} else {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Link", `<`+contextPath+`>; rel="http://www.w3.org/ns/json-ld#context"; type="application/ld+json"`)
	}
	if one {
		_ = json.NewEncoder(w).Encode(out[0])
		return
	}
	_ = json.NewEncoder(w).Encode(out)
}

func (f *Feed) get(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	for _, e := range f.snapshot().entities(f.cfg.AlmostFull) {
		if e.id == id {
			f.render(w, r, []entity{e}, true)
			return
		}
	}
	problem(w, http.StatusNotFound, "ResourceNotFound", "no entity "+strconv.Quote(id))
}

func (f *Feed) list(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	types, ids := splitList(q.Get("type")), splitList(q.Get("id"))
	if len(types) == 0 && len(ids) == 0 {
		problem(w, http.StatusBadRequest, "BadRequestData", "give type (ParkingSpot, OffStreetParking, TrafficSignal) or id")
		return
	}
	limit, offset, err := paging(q.Get("limit"), q.Get("offset"))
	if err != "" {
		problem(w, http.StatusBadRequest, "BadRequestData", err)
		return
	}
	var es []entity
	for _, e := range f.snapshot().entities(f.cfg.AlmostFull) {
		if (len(types) == 0 || slices.Contains(types, e.typ)) && (len(ids) == 0 || slices.Contains(ids, e.id)) {
			es = append(es, e)
		}
	}
	if q.Get("count") == "true" {
		w.Header().Set("NGSILD-Results-Count", strconv.Itoa(len(es)))
	}
	es = es[min(offset, len(es)):]
	es = es[:min(limit, len(es))]
	f.render(w, r, es, false)
}

func splitList(s string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(s, ",")
}

func paging(l, o string) (limit, offset int, problem string) {
	limit, offset = defaultLimit, 0
	if l != "" {
		n, err := strconv.Atoi(l)
		if err != nil || n < 0 || n > maxLimit {
			return 0, 0, "limit must be a whole number from 0 to " + strconv.Itoa(maxLimit)
		}
		limit = n
	}
	if o != "" {
		n, err := strconv.Atoi(o)
		if err != nil || n < 0 {
			return 0, 0, "offset must be a whole number ≥ 0"
		}
		offset = n
	}
	return limit, offset, ""
}
