// Package httpapi holds what every CityPulse HTTP endpoint shares: the JSON
// envelope of the Prometheus-style API ({"status":"success","data":…} or
// {"status":"error","errorType":…,"error":…}), request body limits, and a
// listener that bounds the number of HTTP connections in total and per source
// address. It knows nothing of the routes; the server mounts them.
package httpapi
