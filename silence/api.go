package silence

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"

	"github.com/citypulse/citypulse/internal/httpapi"
)

// maxBody bounds a request body.
const maxBody = 64 << 10

// Register mounts the endpoints on mux: reads behind read, changes behind
// operate (the operator role).
//
//	GET    /api/v1/silences          the silences not yet ended
//	POST   /api/v1/silences          {matchers, startsAt?, endsAt, createdBy, comment}
//	DELETE /api/v1/silences/{id}     expire now
//	POST   /api/v1/acks              {fingerprint, startsAt, by, comment}
//	GET    /api/v1/acks              the acknowledgements
func (s *Store) Register(mux *http.ServeMux, read, operate func(http.Handler) http.Handler) {
	mux.Handle("GET /api/v1/silences", read(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		reply(w, http.StatusOK, s.Silences())
	})))
	mux.Handle("POST /api/v1/silences", operate(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var sl Silence
		if err := decode(w, r, &sl); err != nil {
			fail(w, http.StatusBadRequest, err)
			return
		}
		sl, err := s.Add(sl)
		if err != nil {
			fail(w, codeOf(err), err)
			return
		}
		reply(w, http.StatusOK, sl)
	})))
	mux.Handle("DELETE /api/v1/silences/{id}", operate(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := s.Expire(r.PathValue("id")); err != nil {
			code := codeOf(err)
			if errors.Is(err, ErrNotFound) {
				code = http.StatusNotFound
			}
			fail(w, code, err)
			return
		}
		reply(w, http.StatusOK, nil)
	})))
	mux.Handle("GET /api/v1/acks", read(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		reply(w, http.StatusOK, s.Acks())
	})))
	mux.Handle("POST /api/v1/acks", operate(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var a Ack
		if err := decode(w, r, &a); err != nil {
			fail(w, http.StatusBadRequest, err)
			return
		}
		a, err := s.Acknowledge(a)
		if err != nil {
			fail(w, codeOf(err), err)
			return
		}
		reply(w, http.StatusOK, a)
	})))
}

// decode reads one JSON value of at most maxBody bytes and nothing after it.
func decode(w http.ResponseWriter, r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return errors.New("trailing data after the JSON body")
	}
	return nil
}

// codeOf is the status for a failed change: 400 for what was asked, 503
// where the store is a read-only copy (a standby site), 500 when it could
// not be saved.
func codeOf(err error) int {
	var ve *ValidationError
	switch {
	case errors.As(err, &ve):
		return http.StatusBadRequest
	case errors.Is(err, ErrReadOnly):
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

func reply(w http.ResponseWriter, code int, data any) { httpapi.WriteData(w, code, data) }

func fail(w http.ResponseWriter, code int, err error) {
	httpapi.WriteError(w, code, "bad_data", err.Error())
}
