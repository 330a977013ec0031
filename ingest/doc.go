// Package ingest owns the gateways through which devices send readings: the
// embedded MQTT broker (mochi-mqtt), the external-broker subscriber (paho) and the
// CoAP server (go-coap, UDP and DTLS-PSK). A gateway authenticates the device,
// hands the message to the shared Handler (decode, validate, count rejects,
// queue) and acknowledges the device only after the pipeline has journaled it,
// in the order its messages came, while reading its next ones meanwhile.
//
// The common case of each gateway bypasses its library's general path: a
// publish to the device's own topic is taken in mochi's packet-read hook
// (brokeracks.go), the external subscriber reads PUBLISH packets out of
// paho's stream (subscription.go), and a plain CoAP/UDP POST is taken by the
// UDP reader (coapdirect.go). Everything else goes through the library.
//
// It must not know about storage or rules.
package ingest
