// Package ingest owns the gateways through which devices send readings: the
// embedded MQTT broker (mochi-mqtt), the external-broker subscriber (paho) and the
// CoAP server (go-coap, UDP and DTLS-PSK). A gateway authenticates the device,
// hands the message to the shared Handler (decode, validate, count rejects,
// queue) and acknowledges the device only after the pipeline has journaled it,
// in the order its messages came, while reading its next ones meanwhile.
//
// It must not know about storage or rules.
package ingest
