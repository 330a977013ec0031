// Package devices owns what CityPulse knows about field devices: the five kinds
// and their metric schemas (unit, physical range, gauge/counter/state), the device
// registry with credentials, and validation of a value against its schema.
//
// It must not know about transports (MQTT, CoAP) or stores.
package devices
