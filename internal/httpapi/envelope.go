package httpapi

import (
	"encoding/json"
	"net/http"
)

// envelope is the answer of every JSON endpoint, in the Prometheus HTTP API's
// shape so that Grafana and promtool read it.
type envelope struct {
	Status    string `json:"status"`
	Data      any    `json:"data,omitempty"`
	ErrorType string `json:"errorType,omitempty"`
	Error     string `json:"error,omitempty"`
}

// WriteData answers code with {"status":"success","data":data}.
func WriteData(w http.ResponseWriter, code int, data any) {
	write(w, code, envelope{Status: "success", Data: data})
}

// WriteError answers code with {"status":"error","errorType":typ,"error":msg};
// errorType is left out when typ is empty.
func WriteError(w http.ResponseWriter, code int, typ, msg string) {
	write(w, code, envelope{Status: "error", ErrorType: typ, Error: msg})
}

func write(w http.ResponseWriter, code int, e envelope) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(e)
}
