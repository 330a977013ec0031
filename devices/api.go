package devices

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"time"

	"github.com/citypulse/citypulse/internal/httpapi"
)

// API serves the device registry over HTTP:
//
//	GET    /api/v1/devices        list (secrets never included)
//	GET    /api/v1/devices/{id}   one device
//	POST   /api/v1/devices        add: {"id","kind","district","interval":"10s","secret"}
//	DELETE /api/v1/devices/{id}   remove
//
// Authorisation is the caller's (the server wraps the changing routes with the
// admin token).
type API struct {
	reg registry
	log *slog.Logger
}

// registry is what the API reads and changes; *Registry is one.
type registry interface {
	List() []Device
	Get(id string) (Device, bool)
	Add(d Device) error
	Remove(id string) error
}

// NewAPI returns the device API over reg.
func NewAPI(reg registry, log *slog.Logger) *API {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &API{reg: reg, log: log}
}

// List handles GET /api/v1/devices.
func (a *API) List(w http.ResponseWriter, _ *http.Request) {
	list := a.reg.List()
	out := make([]PublicDevice, len(list))
	for i, d := range list {
		out[i] = d.Public()
	}
	httpapi.WriteData(w, http.StatusOK, out)
}

// Get handles GET /api/v1/devices/{id}.
func (a *API) Get(w http.ResponseWriter, r *http.Request) {
	d, ok := a.reg.Get(r.PathValue("id"))
	if !ok {
		writeError(w, http.StatusNotFound, "unknown device "+r.PathValue("id"))
		return
	}
	httpapi.WriteData(w, http.StatusOK, d.Public())
}

type addRequest struct {
	ID       string `json:"id"`
	Kind     Kind   `json:"kind"`
	District string `json:"district"`
	Interval string `json:"interval"`
	Secret   string `json:"secret"`
}

// MaxAddBody bounds the body of POST /api/v1/devices, MaxSecretLen a
// device's secret in it (an MQTT password and a DTLS pre-shared key need no
// more).
const (
	MaxAddBody   = 64 << 10
	MaxSecretLen = 256
)

// Add handles POST /api/v1/devices: one JSON object, nothing after it.
func (a *API) Add(w http.ResponseWriter, r *http.Request) {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, MaxAddBody))
	dec.DisallowUnknownFields()
	var req addRequest
	err := dec.Decode(&req)
	if err == nil {
		if _, terr := dec.Token(); terr != io.EOF {
			err = errors.New("trailing data after the JSON object")
		}
	}
	var tooLarge *http.MaxBytesError
	switch {
	case errors.As(err, &tooLarge):
		writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("decode device: the body is over %d bytes", MaxAddBody))
		return
	case err != nil:
		writeError(w, http.StatusBadRequest, "decode device: "+err.Error())
		return
	case len(req.Secret) > MaxSecretLen:
		writeError(w, http.StatusBadRequest, fmt.Sprintf("secret: at most %d bytes, got %d", MaxSecretLen, len(req.Secret)))
		return
	}
	iv, err := time.ParseDuration(req.Interval)
	if err != nil {
		writeError(w, http.StatusBadRequest, "interval: want a duration such as \"10s\"")
		return
	}
	d := Device{ID: req.ID, Kind: req.Kind, District: req.District, Interval: iv, Secret: req.Secret}
	switch err := a.reg.Add(d); {
	case errors.Is(err, ErrDuplicate):
		writeError(w, http.StatusConflict, err.Error())
	case err != nil && d.Validate() != nil:
		writeError(w, http.StatusBadRequest, err.Error())
	case err != nil:
		a.log.Error("add device", "device", d.ID, "err", err)
		writeError(w, http.StatusInternalServerError, err.Error())
	default:
		a.log.Info("device added", "device", d.ID, "kind", d.Kind, "district", d.District)
		httpapi.WriteData(w, http.StatusCreated, d.Public())
	}
}

// Remove handles DELETE /api/v1/devices/{id}.
func (a *API) Remove(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	switch err := a.reg.Remove(id); {
	case errors.Is(err, ErrUnknownDevice):
		writeError(w, http.StatusNotFound, err.Error())
	case err != nil:
		a.log.Error("remove device", "device", id, "err", err)
		writeError(w, http.StatusInternalServerError, err.Error())
	default:
		a.log.Info("device removed", "device", id)
		w.WriteHeader(http.StatusNoContent)
	}
}

func writeError(w http.ResponseWriter, code int, msg string) {
	httpapi.WriteError(w, code, "", msg)
}
